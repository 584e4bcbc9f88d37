"""SVG screenshots of every screen and dialog at 80x24, 120x35 and 200x50, into docs/screenshots/.

The real app on the bundled demo model, with a throwaway data folder holding two chats (nothing of
the user's is read or written). Look at them after a UI change: `python scripts/screenshots.py
[--sizes 80x24,120x35] [--out DIR]`. Each file is `<screen>-<width>x<height>.svg`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(80, 24), (120, 35), (200, 50)]
QUESTION = "What is a harbor?"
ANSWER = (
    "A **harbor** is a sheltered body of water where ships can dock safely.\n\n"
    "```python\nharbors = ['Sydney', 'Rotterdam']\n```\n\nMost harbors have a breakwater."
)


def seed(storage: Any) -> None:
    older = storage.create_conversation("Packing list for a day hike in the mountains").id
    storage.add_message(older, "user", "What should I pack for a day hike?")
    storage.add_message(older, "assistant", "Water, food, a map, a rain jacket and a first-aid kit.")
    newer = storage.create_conversation("Harbors").id
    storage.add_message(newer, "user", QUESTION)
    storage.add_message(newer, "assistant", ANSWER)


async def wait_for(condition: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get there in time")
        await asyncio.sleep(0.05)


async def shoot_all(size: tuple[int, int], out: Path) -> list[Path]:
    from textual.widgets import TabbedContent

    from mixtral_chat.app.chat_app import ChatApp
    from mixtral_chat.app.screens.settings import SettingsScreen
    from mixtral_chat.app.settings import Settings
    from mixtral_chat.app.storage import Storage
    from mixtral_chat.engine.options import GenerationConfig

    settings = Settings()
    settings.generation = GenerationConfig(max_tokens=16)
    settings.engine.device = "cpu"
    storage = Storage()
    seed(storage)
    app = ChatApp(storage, settings, model="demo")
    written: list[Path] = []
    width, height = size

    async def shot(name: str) -> None:
        await asyncio.sleep(0.3)  # let the last frame settle
        app.clear_notifications()
        await asyncio.sleep(0.1)
        path = out / f"{name}-{width}x{height}.svg"
        app.save_screenshot(path.name, str(out))
        written.append(path)

    async def dialog(key: str, name: str, screen_type: type, close: str = "escape") -> None:
        await pilot.press(key)
        await wait_for(lambda: isinstance(app.screen, screen_type))
        await shot(name)
        await pilot.press(close)
        await wait_for(lambda: not isinstance(app.screen, screen_type))

    from mixtral_chat.app.screens.dialogs import (
        ChatOptionsScreen,
        ConfirmScreen,
        SearchScreen,
        TextInputScreen,
    )
    from mixtral_chat.app.screens.help import HelpScreen
    from mixtral_chat.app.screens.text_view import TextViewScreen

    async with app.run_test(size=size) as pilot:
        await wait_for(lambda: app.model_status.state == "ready")
        screen = app.chat_screen
        screen.prompt.cursor_blink = False
        await wait_for(lambda: len(screen.message_list.views) == 2)
        await shot("chat")
        await pilot.press("ctrl+b")
        await shot("chat-sidebar-toggled")
        await pilot.press("ctrl+b")
        if screen.has_class("-narrow"):
            await pilot.press("escape")
        await pilot.press("ctrl+g")
        await shot("chat-cache-panel")
        await pilot.press("ctrl+g")
        await dialog("f1", "help", HelpScreen)
        await dialog("ctrl+o", "chat-options", ChatOptionsScreen)
        await dialog("ctrl+f", "search", SearchScreen)
        await dialog("f2", "rename", TextInputScreen)
        await dialog("f8", "delete-chat", ConfirmScreen, close="n")
        await dialog("f9", "export", TextInputScreen)
        screen.message_list.views[-1].focus()
        await dialog("v", "text-view", TextViewScreen)
        screen.prompt.focus()
        await pilot.press("f3")
        await wait_for(lambda: isinstance(app.screen, SettingsScreen))
        for tab in ("models-tab", "engine-tab", "appearance-tab"):
            app.screen.query_one(TabbedContent).active = tab
            await shot(f"settings-{tab.removesuffix('-tab')}")
    storage.close()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in item.split("x")) for item in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        # A throwaway data folder per size: nothing of the user's, and the same two chats each time.
        with tempfile.TemporaryDirectory() as home:
            os.environ["MIXTRAL_CHAT_HOME"] = home
            for path in asyncio.run(shoot_all(size, args.out)):  # type: ignore[arg-type]
                print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
