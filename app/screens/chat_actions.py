"""The chat screen's actions: stop, new chat, regenerate, edit an earlier prompt, search, rename,
delete, export, chat options, the panels and copying."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from textual import on

from mixtral_chat.app.chat_session import (
    generation_values,
)
from mixtral_chat.app.screens.chat_base import ChatScreenBase, shows_errors
from mixtral_chat.app.screens.chat_sync import REFUSED
from mixtral_chat.app.screens.text_view import TextViewScreen
from mixtral_chat.app.storage import (
    Conversation,
    SearchHit,
    StoredMessage,
)
from mixtral_chat.app.widgets.message_view import MessageView
from mixtral_chat.app.widgets.prompt import PromptInput
from mixtral_chat.engine.errors import MixtralChatError

if TYPE_CHECKING:
    from mixtral_chat.app.screens.dialogs import ChatOptions


def home_relative(path: Path) -> str:
    """`path` with the home folder written `~`, as people read paths."""
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


class ChatActions(ChatScreenBase):
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Greyed out (None) in the footer when they cannot run now.
        if action == "regenerate":
            return None if self.is_generating or self.conversation_id is None else True
        if action in ("rename", "delete_chat", "export"):
            return None if self.conversation_id is None else True
        return True

    def action_stop(self) -> None:
        if self.close_folded_sidebar():
            return
        if self.generation is not None:
            self.generation.stop_event.set()
            self.notify("Stopping: the answer so far is kept.", timeout=2)
        elif self.editing_message_id is not None:
            self._cancel_edit()
            self.prompt.clear()
        else:
            self.prompt.focus()

    @shows_errors
    async def action_new_chat(self) -> None:
        await self.new_chat()
        self.prompt.focus()

    @shows_errors
    async def action_regenerate(self) -> None:
        if self.is_generating:
            self.notify("An answer is still being written: press Esc to stop it first.", severity="warning")
            return
        if self.conversation_id is None:
            return
        conversation_id = self.conversation_id
        # The messages this app shows, as the database still has them (checked again below).
        messages = [m for m in self.storage.messages(conversation_id) if m.id in self.shown]
        last_user = next((m for m in reversed(messages) if m.role == "user"), None)
        if last_user is None:
            self.notify("Nothing to answer yet.", severity="warning")
            return
        deleted = await self._checked_write(
            lambda: self.storage.delete_messages_from(
                conversation_id, last_user.id + 1, expected=self.shown, claim=True
            ),
            if_busy="regenerate when it is done.",
            if_changed="nothing was deleted; press Ctrl+R again to regenerate.",
        )
        if deleted is REFUSED:
            return
        if deleted:
            await self.open_conversation(conversation_id)
        await self.start_generation()

    @on(MessageView.EditRequested)
    @shows_errors
    def _edit_requested(self, event: MessageView.EditRequested) -> None:
        if self.is_generating:
            self.notify("An answer is still being written: press Esc to stop it first.", severity="warning")
            return
        self.editing_message_id = event.view.message_id
        self.prompt.set_text(event.view.text)
        self.prompt.border_title = "Editing an earlier message: Enter answers again from there, Esc cancels"
        self.prompt.add_class("-editing")
        self.prompt.focus()

    @on(MessageView.ViewTextRequested)
    def _view_text_requested(self, event: MessageView.ViewTextRequested) -> None:
        self.app.push_screen(
            TextViewScreen("Select with the mouse or Shift+arrows; Esc closes", event.view.text)
        )

    def _cancel_edit(self) -> None:
        if self.editing_message_id is not None:
            self.editing_message_id = None
            self.prompt.border_title = None
            self.prompt.remove_class("-editing")

    async def _resend_edited(self, message_id: int, text: str) -> None:
        """Replace an earlier prompt, drop everything after it, and answer again."""
        self._cancel_edit()
        conversation_id = self.conversation_id
        if conversation_id is None or message_id not in self.shown:
            self.notify("The message being edited is no longer shown.", severity="warning")
            return
        edit = await self._checked_write(
            lambda: self.storage.edit_message(
                conversation_id, message_id, text, expected=self.shown, claim=True
            ),
            if_busy="your edit is kept in the prompt.",
            if_changed="nothing was changed; your edit is kept in the prompt.",
        )
        if edit is REFUSED:
            return
        edited = self.storage.get_message(message_id)
        self.prompt.clear()
        self.prompt.remember(text)
        await self.open_conversation(edited.conversation_id)
        await self.start_generation()

    @shows_errors
    def action_search(self) -> None:
        from mixtral_chat.app.screens.dialogs import SearchScreen  # dialogs load on first use

        async def opened(hit: SearchHit | None) -> None:
            if hit is not None:
                await self._show_hit(hit)

        self.app.push_screen(SearchScreen(self.storage), self._guarded(opened))

    async def _show_hit(self, hit: SearchHit) -> None:
        await self.open_conversation(hit.conversation_id, include_id=hit.message_id)
        view = self.message_list.view_for(hit.message_id)
        if view is not None:
            self.message_list.release_anchor()
            view.add_class("-found")
            view.focus()
            self.message_list.scroll_to_widget(view, animate=False, top=True)

    @shows_errors
    def action_rename(self) -> None:
        from mixtral_chat.app.screens.dialogs import TextInputScreen

        conversation = self.current_conversation()
        if conversation is None:
            return

        def renamed(title: str | None) -> None:
            if title is not None and title.strip():
                self.storage.rename_conversation(conversation.id, title)
                if self.conversation_id == conversation.id:
                    self._set_title(self.storage.get_conversation(conversation.id).title)
                self.refresh_sidebar()

        self.app.push_screen(TextInputScreen("Rename this chat", conversation.title), self._guarded(renamed))

    @shows_errors
    def action_delete_chat(self) -> None:
        from mixtral_chat.app.screens.dialogs import ConfirmScreen

        conversation = self.current_conversation()
        if conversation is None:
            return
        count = len(self.storage.messages(conversation.id))
        expected = dict(self.shown)  # what the question is about: the messages shown now

        async def answered(confirmed: bool | None) -> None:
            if not confirmed:
                return
            deletion = await self._checked_write(
                lambda: self.storage.delete_conversation(conversation.id, expected=expected),
                if_busy="nothing was deleted.",
                if_changed="nothing was deleted.",
            )
            if deletion is REFUSED:
                return
            if self.generation is not None and self.generation.conversation_id == conversation.id:
                self.generation.stop_event.set()
                self.generation.chat_deleted = True
            self.notify(f"Deleted “{conversation.title}”.")
            await self._open_latest()

        self.app.push_screen(
            ConfirmScreen(f"Delete “{conversation.title}” and its {count} messages? This cannot be undone."),
            self._guarded(answered),
        )

    @shows_errors
    def action_export(self) -> None:
        """Ask where (a default in the data folder), then write Markdown, or JSON for a .json name."""
        conversation_id = self.conversation_id
        if conversation_id is None:
            return
        from mixtral_chat.app.screens.dialogs import TextInputScreen
        from mixtral_chat.engine.paths import data_dir

        default = data_dir() / "exports" / f"{self.storage.export_name(conversation_id)}.md"

        def chosen(answer: str | None) -> None:
            if not answer or not answer.strip():
                return
            try:
                path = self.storage.export_file(conversation_id, Path(answer.strip()).expanduser())
            except OSError as exc:
                self.notify(f"Export failed: {exc.strerror or exc}", severity="error")
                return
            # File and folder on lines of their own: a toast wraps a long line wherever it must.
            self.notify(f"{path.name}\nin {home_relative(path.parent)}", title="Exported", timeout=8)

        question = "Export this chat to (Markdown; a name ending in .json writes JSON):"
        self.app.push_screen(TextInputScreen(question, str(default)), self._guarded(chosen))

    @shows_errors
    def action_options(self) -> None:
        from mixtral_chat.app.screens.dialogs import ChatOptions, ChatOptionsScreen

        settings = self.chat_app.settings
        conversation = self.current_conversation()
        generation = generation_values(settings.generation, conversation)
        options = ChatOptions(
            system_prompt=conversation.system_prompt if conversation else "",
            persona=conversation.persona if conversation else None,
            generation=generation,
        )

        def saved(result: ChatOptions | None) -> None:
            if result is None:
                return
            conversation_id = self.conversation_id
            if conversation_id is None:
                conversation_id = self.storage.create_conversation(model=self.chat_app.model_name).id
                self.conversation_id = conversation_id
            self.storage.update_conversation_settings(
                conversation_id,
                system_prompt=result.system_prompt,
                persona=result.persona,
                generation=result.generation,
            )
            if result.save_persona_as:
                settings.personas[result.save_persona_as] = result.system_prompt
                self.chat_app.save_settings()
            self.refresh_sidebar()
            self.notify("Chat options saved.")

        self.app.push_screen(ChatOptionsScreen(options, dict(settings.personas)), self._guarded(saved))

    # -- the model of a chat -----------------------------------------------------------------------

    def switch_model(self, name: str) -> None:
        """Answer this chat (and new ones) with `name` from now on; the default model is not
        changed (Settings > Use does that)."""
        if self.is_generating:
            self.notify("Stop the answer being written before switching the model.", severity="warning")
            return
        if self.conversation_id is not None:
            self.storage.set_conversation_model(self.conversation_id, name)
        self.chat_app.model_spec = name
        self.chat_app.load_model(name)

    def follow_chat_model(self, conversation: Conversation) -> None:
        """Load the model `conversation` was last answered with, if another one is loaded."""
        wanted = conversation.model
        if not wanted or wanted == self.chat_app.model_name or self.is_generating:
            return
        if self.chat_app.model_status.state == "loading" and self.chat_app.model_status.name == wanted:
            return
        from mixtral_chat.engine.models.registry import get_model

        try:
            installed = get_model(wanted).installed
        except MixtralChatError:
            return  # a folder given with --model, or a model since removed: keep the one loaded
        if installed:
            self.notify(f"This chat uses {wanted}: loading it.", title="Model")
            self.chat_app.model_spec = wanted
            self.chat_app.load_model(wanted)

    def action_help(self) -> None:
        from mixtral_chat.app.screens.dialogs import ConfirmScreen, SearchScreen
        from mixtral_chat.app.screens.help import HelpScreen
        from mixtral_chat.app.screens.settings import SettingsScreen

        sections = [
            ("Everywhere", [type(self.app)]),
            ("Chat", [type(self)]),
            ("The prompt", [PromptInput]),
            ("A message (Shift+Tab from the prompt, then Up/Down)", [MessageView]),
            ("Settings (F3)", [SettingsScreen]),
            ("Search (Ctrl+F)", [SearchScreen]),
            ("A question", [ConfirmScreen]),
        ]
        self.app.push_screen(HelpScreen(sections, self.chat_app.settings.keymap))

    @property
    def sidebar_folded(self) -> bool:
        """Narrow screens fold the sidebar away; Ctrl+B opens it over the chat for a while."""
        return self.has_class("-narrow")

    def action_toggle_sidebar(self) -> None:
        if self.sidebar_folded:
            self.toggle_class("-sidebar-open")  # this time only: the saved choice is for wider screens
            if self.has_class("-sidebar-open"):
                self.conversation_list.focus()
            else:
                self.prompt.focus()
            return
        self.toggle_class("-hide-sidebar")
        self.chat_app.remember_ui(show_sidebar=not self.has_class("-hide-sidebar"))

    def close_folded_sidebar(self) -> bool:
        """Close the sidebar opened over the chat; False if it was not open."""
        if not (self.sidebar_folded and self.has_class("-sidebar-open")):
            return False
        self.remove_class("-sidebar-open")
        self.prompt.focus()
        return True

    def action_toggle_cache_panel(self) -> None:
        self.toggle_class("-show-cache")
        shown = self.has_class("-show-cache")
        self.chat_app.remember_ui(show_cache_panel=shown)
        if shown:
            engine = self.chat_app.engine
            self.count_repeats()
            self.cache_panel.show_stats(engine.cache_stats() if engine is not None else None)

    def count_repeats(self) -> None:
        """Count the loaded model's routing repeats from now on (the panel shows them)."""
        engine = self.chat_app.engine
        if engine is None or engine.model is None:  # none loaded, or a remote one
            return
        if self.repeats is not None and self.repeats.model is engine.model:
            return
        from mixtral_chat.engine.offload.locality import LiveRepeats

        self.repeats = LiveRepeats(engine.model)

    def last_answer(self) -> StoredMessage | None:
        if self.conversation_id is None:
            return None
        return next(
            (m for m in reversed(self.storage.messages(self.conversation_id)) if m.role == "assistant"), None
        )

    @shows_errors
    def action_copy_last_answer(self) -> None:
        answer = self.last_answer()
        if answer is None:
            self.notify("No answer to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(answer.content)
        self.notify(f"Copied the last answer ({len(answer.content)} characters).")

    @shows_errors
    def action_copy_last_code_block(self) -> None:
        views = [view for view in self.message_list.views if view.role == "assistant"]
        if not views:
            self.notify("No answer to copy from yet.", severity="warning")
            return
        views[-1].action_copy_code()

    async def on_unmount(self) -> None:
        self.save_partial_answer()
