"""Modal dialogs: confirm, one-line text, per-chat options, search."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Footer, Input, Label, OptionList, Select, TextArea
from textual.widgets.option_list import Option

from mixtral_chat.app.storage import MATCH_END, MATCH_START, SearchHit, Storage
from mixtral_chat.engine.options import GenerationConfig, GenerationConfigError


class ConfirmScreen(ModalScreen[bool]):
    """Yes / no. `y` / `n` / Esc work too."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, confirm_label: str = "Delete", *, danger: bool = True) -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.confirm_label = confirm_label
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.confirm_label, variant="error" if self.danger else "primary", id="confirm")
                yield Button("Cancel", id="cancel")
        yield Footer()  # the dialog's keys

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")


class DeleteModelScreen(ConfirmScreen):
    """Delete a model: yes / no like ConfirmScreen, plus a box, off by default, to also delete its
    copy in the Hugging Face cache (which other tools share). Cancel has the focus: Enter keeps all."""

    def __init__(self, question: str, hf_cache_label: str | None = None) -> None:
        super().__init__(question, "Delete")
        self.hf_cache_label = hf_cache_label  # None: no Hugging Face cache copy to offer
        self.delete_hf_cache = False

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question", markup=False)
            if self.hf_cache_label is not None:
                yield Checkbox(self.hf_cache_label, False, id="delete-hf-cache")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.confirm_label, variant="error", id="confirm")
                yield Button("Cancel", id="cancel")
        yield Footer()  # the dialog's keys

    @on(Checkbox.Changed, "#delete-hf-cache")
    def _hf_cache_changed(self, event: Checkbox.Changed) -> None:
        self.delete_hf_cache = event.value


class TextInputScreen(ModalScreen[str | None]):
    """Ask for one line of text (rename a chat, name a persona)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel", id="text_input.cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question", markup=False)
            yield Input(self.value, id="text-input")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")
        yield Footer()  # the dialog's keys

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.query_one(Input).value if event.button.id == "ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclass
class ChatOptions:
    """A chat's system prompt, persona and generation settings (the chat options dialog)."""

    system_prompt: str = ""
    persona: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    save_persona_as: str | None = None  # also store the prompt as a named persona


CUSTOM_PERSONA = "__custom__"


class ChatOptionsScreen(ModalScreen[ChatOptions | None]):
    """System prompt (or a saved persona) and sampling settings for the current chat."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel", id="chat_options.cancel")]

    def __init__(self, options: ChatOptions, personas: dict[str, str]) -> None:
        super().__init__(classes="dialog-screen")
        self.options = options
        self.personas = personas

    def compose(self) -> ComposeResult:
        generation = self.options.generation
        choices = [("Custom system prompt", CUSTOM_PERSONA)] + [(name, name) for name in self.personas]
        persona = self.options.persona if self.options.persona in self.personas else CUSTOM_PERSONA
        with Vertical(classes="dialog wide"):
            yield Label("Chat options", classes="dialog-title")
            yield Label("Persona")
            yield Select(choices, value=persona, allow_blank=False, id="persona")
            yield Label("System prompt")
            yield TextArea(self.options.system_prompt, id="system-prompt", soft_wrap=True)
            with Grid(classes="options-grid"):
                yield Label("Temperature")
                yield Input(str(generation.get("temperature", "")), id="temperature", type="number")
                yield Label("Top-p")
                yield Input(str(generation.get("top_p", "")), id="top_p", type="number")
                yield Label("Top-k (0: off)")
                yield Input(str(generation.get("top_k", "")), id="top_k", type="integer")
                yield Label("Max tokens")
                yield Input(str(generation.get("max_tokens", "")), id="max_tokens", type="integer")
                yield Label("Seed")
                yield Input(
                    "" if generation.get("seed") is None else str(generation["seed"]),
                    id="seed",
                    type="integer",
                    placeholder="random",
                )
                yield Label("Save as persona")
                yield Input("", id="persona-name", placeholder="name (optional)")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")
        yield Footer()  # the dialog's keys

    @on(Select.Changed, "#persona")
    def _persona_changed(self, event: Select.Changed) -> None:
        if event.value in self.personas:
            self.query_one("#system-prompt", TextArea).load_text(self.personas[str(event.value)])

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "save":
            self.dismiss(None)
            return
        try:
            generation = self._read_generation()
        except ValueError as exc:
            self.notify(str(exc), severity="error")
            return
        persona = self.query_one("#persona", Select).value
        name = self.query_one("#persona-name", Input).value.strip() or None
        self.dismiss(
            ChatOptions(
                system_prompt=self.query_one("#system-prompt", TextArea).text.strip(),
                persona=name or (str(persona) if persona in self.personas else None),
                generation=generation,
                save_persona_as=name,
            )
        )

    def _read_generation(self) -> dict[str, Any]:
        """The chat's sampling as typed, checked by GenerationConfig (the one set of bounds)."""

        def number(field_id: str, kind: type) -> Any:
            raw = self.query_one(f"#{field_id}", Input).value.strip()
            try:
                return kind(raw)
            except ValueError:
                kind_name = "a whole number" if kind is int else "a number"
                raise ValueError(f"{field_id.replace('_', ' ')}: {raw!r} is not {kind_name}") from None

        seed_text = self.query_one("#seed", Input).value.strip()
        generation = {
            "temperature": number("temperature", float),
            "top_p": number("top_p", float),
            "top_k": number("top_k", int),
            "max_tokens": number("max_tokens", int),
            "seed": number("seed", int) if seed_text else None,
        }
        try:
            GenerationConfig(**generation)
        except GenerationConfigError as exc:
            raise ValueError(str(exc)) from None
        return generation

    def action_cancel(self) -> None:
        self.dismiss(None)


def snippet_text(snippet: str) -> Text:
    """A search snippet with the matched terms highlighted."""
    text = Text()
    highlighted = False
    for part in snippet.replace(MATCH_END, MATCH_START).split(MATCH_START):
        text.append(re.sub(r"\s+", " ", part), style="bold reverse" if highlighted else "")
        highlighted = not highlighted
    return text


class SearchScreen(ModalScreen[SearchHit | None]):
    """Full-text search over every conversation; Enter opens the chosen message's chat."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Close", id="search.cancel"),
        Binding("down", "focus_results", "Results", id="search.results", show=False),
    ]

    def __init__(self, storage: Storage, query: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.storage = storage
        self.initial_query = query
        self.hits: list[SearchHit] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide tall"):
            yield Label("Search all conversations", classes="dialog-title")
            yield Input(self.initial_query, placeholder="words to find…", id="search-input")
            yield OptionList(id="search-results")
            yield Label("", id="search-count", markup=False)
        yield Footer()  # the dialog's keys

    def on_mount(self) -> None:
        self.query_one(Input).focus()
        self._run(self.initial_query)

    @on(Input.Changed, "#search-input")
    def _changed(self, event: Input.Changed) -> None:
        self._run(event.value)

    @on(Input.Submitted, "#search-input")
    def _submitted(self, event: Input.Submitted) -> None:
        if self.hits:
            self.dismiss(self.hits[0])

    @on(OptionList.OptionSelected, "#search-results")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.hits[event.option_index])

    def _run(self, query: str) -> None:
        self.hits = self.storage.search(query)
        results = self.query_one("#search-results", OptionList)
        results.clear_options()
        options = []
        for hit in self.hits:
            label = Text(hit.conversation_title, style="bold")
            label.append(f"  ({'you' if hit.role == 'user' else hit.role})\n", style="dim")
            label.append_text(snippet_text(hit.snippet))
            options.append(Option(label, id=f"hit-{hit.message_id}"))
        results.add_options(options)
        count = len(self.hits)
        self.query_one("#search-count", Label).update(
            "" if not query.strip() else f"{count} message{'s' if count != 1 else ''} found"
        )

    def action_focus_results(self) -> None:
        results = self.query_one("#search-results", OptionList)
        if self.hits:
            results.focus()
            results.highlighted = 0

    def action_cancel(self) -> None:
        self.dismiss(None)
