"""One chat message as Markdown, and the scrolling list of them.

Answers stream through `Markdown.get_stream` (a MarkdownStream batches fragments, so the widget
is never re-rendered from scratch per token); when the answer ends the full text is rendered once
more, so code fences that arrived in pieces are complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Button, Label

from mixtral_chat.app.clipboard import copy_with_system_tool, system_clipboard_command
from mixtral_chat.app.storage import StoredMessage

if TYPE_CHECKING:
    from textual.widgets import Markdown
    from textual.widgets.markdown import MarkdownStream

# ``` or ~~~ fences (CommonMark): the code is what lies between the opening and closing fence.
_FENCE = re.compile(
    r"^(?P<fence>`{3,}|~{3,})[^\n]*\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL
)

STATUS_LABELS = {
    "complete": "",
    "streaming": "writing…",
    "stopped": "stopped",
    "error": "failed",
    "interrupted": "interrupted",  # saved as streaming by an app that is gone
}


def code_blocks(markdown: str) -> list[str]:
    """The contents of the fenced code blocks in a Markdown text, in order."""
    return [match.group("code").rstrip("\n") for match in _FENCE.finditer(markdown)]


class MessageView(Vertical, can_focus=True):
    """A message: a header (role, status) and the Markdown body. Focus it (Tab or click) to copy
    it (c), copy a code block (b, repeat for the next block) or edit a prompt (e)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "copy", "Copy", id="message.copy"),
        Binding("b", "copy_code", "Copy code", id="message.copy_code"),
        Binding("e", "edit", "Edit", id="message.edit"),
        Binding("v", "view_text", "Select text", id="message.view_text"),
        Binding("up,k", "focus_neighbour(-1)", "Previous", id="message.previous", show=False),
        Binding("down,j", "focus_neighbour(1)", "Next", id="message.next", show=False),
    ]

    @dataclass(eq=False)
    class EditRequested(Message):
        view: MessageView

        @property
        def control(self) -> MessageView:
            return self.view

    @dataclass(eq=False)
    class ViewTextRequested(Message):
        """Show the text to select by hand (the screen opens the view)."""

        view: MessageView

        @property
        def control(self) -> MessageView:
            return self.view

    def __init__(self, message: StoredMessage, *, interrupted: bool = False) -> None:
        self.message_id = message.id
        self.role = message.role
        self.text = message.content
        status = "interrupted" if interrupted else message.status
        super().__init__(classes=f"message {message.role}", id=f"message-{message.id}")
        self.status = status
        self._stream: MarkdownStream | None = None
        self._code_index = 0

    def compose(self) -> ComposeResult:
        # Imported here: markdown-it costs start-up time, and the first frame has no messages.
        from textual.widgets import Markdown

        yield Label(self._header_text(), classes="message-header", markup=False)
        yield Markdown(self.text, classes="message-body")

    @property
    def body(self) -> Markdown:
        from textual.widgets import Markdown

        return self.query_one(".message-body", Markdown)

    @property
    def header(self) -> Label:
        return self.query_one(".message-header", Label)

    @property
    def is_streaming(self) -> bool:
        return self._stream is not None

    def _header_text(self) -> str:
        who = {"user": "You", "assistant": "Assistant", "system": "System"}.get(self.role, self.role)
        label = STATUS_LABELS.get(self.status, self.status)
        return f"{who} · {label}" if label else who

    def set_status(self, status: str) -> None:
        self.status = status
        self.set_class(status == "stopped", "-stopped")
        self.set_class(status in ("error", "interrupted"), "-failed")
        self.set_class(status == "streaming", "-streaming")
        if self.is_mounted:
            self.header.update(self._header_text())

    def on_mount(self) -> None:
        self.set_status(self.status)

    # -- streaming -------------------------------------------------------------------------------

    async def start_stream(self, text_so_far: str = "") -> None:
        """Begin (or resume, after the view was rebuilt) streaming into this message."""
        self.text = text_so_far
        await self.body.update(text_so_far)
        body = self.body
        self._stream = type(body).get_stream(body)
        self.set_status("streaming")

    async def append(self, text: str) -> None:
        if self._stream is None:
            await self.start_stream(self.text)
        assert self._stream is not None
        self.text += text
        await self._stream.write(text)

    async def stop_stream(self) -> None:
        """Stop the MarkdownStream's task, its pending text written (before the view goes: a task
        left behind is destroyed pending)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()

    async def finish(self, text: str, status: str) -> None:
        """End streaming: render the whole text once (complete code fences) and mark the status."""
        await self.stop_stream()
        self.text = text
        await self.body.update(text)
        self.set_status(status)

    # -- actions ---------------------------------------------------------------------------------

    def action_copy(self) -> None:
        self.copy_text(self.text, f"Copied the message ({len(self.text)} characters).")

    def copy_text(self, text: str, done: str) -> None:
        """To the terminal's clipboard and, in a desktop session, the system's (in a thread: the
        tool may take a moment). Where neither reaches, `v` shows the text to select by hand."""
        self.app.copy_to_clipboard(text)
        command = system_clipboard_command()
        if command is not None:
            self.run_worker(lambda: copy_with_system_tool(text, command), thread=True, group="clipboard")
            self.notify(done)
        else:
            self.notify(f"{done} If it does not paste, press v to select the text.")

    def action_view_text(self) -> None:
        self.post_message(self.ViewTextRequested(self))

    def action_copy_code(self) -> None:
        blocks = code_blocks(self.text)
        if not blocks:
            self.notify("This message has no code block.", severity="warning")
            return
        index = self._code_index % len(blocks)
        self._code_index = index + 1
        self.copy_text(blocks[index], f"Copied code block {index + 1} of {len(blocks)}.")

    def action_edit(self) -> None:
        if self.role != "user":
            self.notify("Only your own messages can be edited.", severity="warning")
            return
        self.post_message(self.EditRequested(self))

    def action_focus_neighbour(self, step: int) -> None:
        siblings = (
            [child for child in self.parent.children if isinstance(child, MessageView)] if self.parent else []
        )
        index = siblings.index(self) + step
        if 0 <= index < len(siblings):
            siblings[index].focus()
            siblings[index].scroll_visible()
        elif step > 0:
            self.screen.focus_next()

    def on_click(self, event: events.Click) -> None:
        """A click on a code block copies it."""
        from textual.widgets.markdown import MarkdownFence

        node = event.widget
        while node is not None and node is not self:
            if isinstance(node, MarkdownFence):
                self.app.copy_to_clipboard(node.code)
                self.notify("Copied the code block to the clipboard.")
                return
            node = node.parent  # type: ignore[assignment]


# Opening a chat mounts only its latest messages: every Markdown message is dozens of widgets to
# lay out, and a long chat would otherwise take seconds to open. Earlier ones come on request.
INITIAL_WINDOW = 6
EARLIER_BATCH = 20


class MessageList(VerticalScroll):
    """The messages of one conversation. Anchored to the bottom while the user is there: Textual
    releases the anchor when the user scrolls up and restores it back at the bottom."""

    can_focus = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._earlier: list[StoredMessage] = []  # not mounted yet, oldest first
        self._streaming_id: int | None = None

    @property
    def views(self) -> list[MessageView]:
        return list(self.query(MessageView))

    @property
    def earlier_count(self) -> int:
        return len(self._earlier)

    def view_for(self, message_id: int) -> MessageView | None:
        for view in self.query(MessageView):
            if view.message_id == message_id:
                return view
        return None

    def _view(self, message: StoredMessage) -> MessageView:
        # Answers saved as `streaming` that no generation of this app is writing were cut off
        # (a crash, or another instance): shown as interrupted.
        return MessageView(
            message, interrupted=message.status == "streaming" and message.id != self._streaming_id
        )

    async def show(
        self,
        messages: list[StoredMessage],
        *,
        streaming_id: int | None = None,
        include_id: int | None = None,
    ) -> None:
        """Replace the list with the latest `messages` (and `include_id` and everything after it)."""
        self._streaming_id = streaming_id
        start = max(0, len(messages) - INITIAL_WINDOW)
        if include_id is not None:
            start = min([start] + [index for index, m in enumerate(messages) if m.id == include_id])
        self._earlier = messages[:start]
        for view in self.query(MessageView):  # an answer streaming into a view about to go
            await view.stop_stream()
        await self.remove_children()
        widgets: list[Widget] = []
        if self._earlier:
            widgets.append(Button(self._earlier_label(), id="show-earlier", classes="show-earlier"))
        widgets += [self._view(message) for message in messages[start:]]
        if widgets:
            await self.mount_all(widgets)
        self.anchor()

    def _earlier_label(self) -> str:
        count = len(self._earlier)
        return f"▲ {count} earlier message{'s' if count != 1 else ''}: show {min(count, EARLIER_BATCH)} more"

    async def show_earlier(self) -> None:
        """Mount the next batch of earlier messages above the ones shown."""
        if not self._earlier:
            return
        batch, self._earlier = self._earlier[-EARLIER_BATCH:], self._earlier[:-EARLIER_BATCH]
        button = self.query_one("#show-earlier", Button)
        self.release_anchor()
        await self.mount_all([self._view(message) for message in batch], after=button)
        if self._earlier:
            button.label = self._earlier_label()
        else:
            await button.remove()

    @on(Button.Pressed, "#show-earlier")
    async def _show_earlier_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        await self.show_earlier()

    async def add(self, message: StoredMessage) -> MessageView:
        view = MessageView(message)
        await self.mount(view)
        self.anchor()
        return view
