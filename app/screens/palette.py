"""Command palette (Ctrl+P) entries: the chat actions, "Switch model: <name>" for each installed
model, and "Open chat: <title>" for each chat."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content

if TYPE_CHECKING:
    from textual.fuzzy import Matcher

    from mixtral_chat.app.chat_app import ChatApp

# (title, help, action on the chat screen)
CHAT_ACTIONS: tuple[tuple[str, str, str], ...] = (
    ("New chat", "Start an empty conversation (Ctrl+N)", "new_chat"),
    ("Stop answer", "Stop the answer being written; keep what is there (Esc)", "stop"),
    ("Regenerate answer", "Answer the last prompt again (Ctrl+R)", "regenerate"),
    ("Search conversations", "Full-text search over every chat (Ctrl+F)", "search"),
    ("Chat options", "System prompt, persona, temperature, top-p, max tokens, seed (Ctrl+O)", "options"),
    ("Rename chat", "Give this conversation a new title (F2)", "rename"),
    ("Delete chat", "Delete this conversation after a confirmation (F8)", "delete_chat"),
    ("Export chat", "Write this conversation to a file: Markdown, or JSON (F9)", "export"),
    ("Copy last answer", "Copy the last answer to the clipboard", "copy_last_answer"),
    (
        "Copy last code block",
        "Copy a code block of the last answer (repeat for the next)",
        "copy_last_code_block",
    ),
    ("Toggle sidebar", "Show or hide the list of chats (Ctrl+B)", "toggle_sidebar"),
    (
        "Toggle expert cache panel",
        "Show which experts are resident, hit, missed, prefetched (Ctrl+G)",
        "toggle_cache_panel",
    ),
)


class ChatCommands(Provider):
    @property
    def chat_app(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    def _commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        app = self.chat_app
        screen = app.chat_screen
        commands: list[tuple[str, str, Callable[[], object]]] = []
        if self.screen is screen:
            commands += [
                (title, help, partial(screen.run_action, action)) for title, help, action in CHAT_ACTIONS
            ]
        commands.append(("Settings", "Models, downloads, engine options, theme (F3)", app.action_settings))
        if self.screen is screen:
            commands += [
                (
                    f"Switch model: {name}",
                    "Answer this chat with it from now on",
                    partial(screen.switch_model, name),
                )
                for name in self._installed_models()
            ]
        return commands

    def _installed_models(self) -> list[str]:
        """Registered models on this machine, but the one loaded now."""
        from mixtral_chat.engine.errors import MixtralChatError
        from mixtral_chat.engine.models.registry import list_models

        try:
            entries = list_models()
        except MixtralChatError:
            return []
        return [entry.name for entry in entries if entry.installed and entry.name != self.chat_app.model_name]

    async def discover(self) -> Hits:
        for title, help, command in self._commands():
            yield DiscoveryHit(Content(title), command, text=title, help=help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help, command in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, highlighted(matcher, title), command, text=title, help=help)
        screen = self.chat_app.chat_screen
        if self.screen is not screen:
            return
        for conversation in self.chat_app.storage.list_conversations():
            title = f"Open chat: {conversation.title}"
            score = matcher.match(title)
            if score > 0:
                yield Hit(
                    score,
                    highlighted(matcher, title),
                    partial(screen.open_conversation, conversation.id, follow_model=True),
                    text=title,
                )


def highlighted(matcher: Matcher, text: str) -> Content:
    """`matcher.highlight(text)` without reading text as markup: chat titles and model names are
    the user's own (a "[/]" in one would raise)."""
    content = Content(text)
    _, offsets = matcher.fuzzy_search.match(matcher.query, text)
    for offset in offsets:
        if not text[offset].isspace():
            content = content.stylize(matcher.match_style, offset, offset + 1)
    return content
