"""Render the screenshots of docs/monitor.md of ``swarmloco monitor`` from the recorded fixture.

    python scripts/tui_screenshots.py [--size 100x32] [--out docs]

Writes ``monitor-node.svg`` and ``monitor-swarm.svg``; also PNGs when ``rsvg-convert`` or
``cairosvg`` is available. The clock is pinned to the recording, so the output is reproducible
(event times are shown in the local time zone; set TZ=UTC for byte-identical files).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import subprocess
from pathlib import Path

from swarmloco.tui.app import MonitorApp
from swarmloco.tui.sources import RecordedSource, load_recording

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "tests" / "fixtures" / "monitor_recording.jsonl"


def make_app(frames: list[dict]) -> MonitorApp:
    """An app replaying ``frames``, with the clock pinned to the last frame's time."""
    end = float(frames[-1]["recorded_at"])
    return MonitorApp(
        RecordedSource(frames, key="status"),
        RecordedSource(frames, key="peers"),
        clock=lambda: end,
        refresh_interval=3600,  # polled by hand below, one frame per poll
    )


async def shoot(out: Path, size: tuple[int, int], recording: Path = RECORDING) -> list[Path]:
    frames = load_recording(recording)
    app = make_app(frames)
    written: list[Path] = []
    async with app.run_test(size=size) as pilot:
        for _ in range(len(frames)):  # the first poll starts on mount
            await app.workers.wait_for_complete()
            await pilot.pause()
            app.refresh_data()
        await app.workers.wait_for_complete()
        await pilot.pause()
        for view in ("node", "swarm"):
            if app.current_view != view:
                await pilot.press("tab")
                await pilot.pause()
            name = f"monitor-{view}.svg"
            app.save_screenshot(name, str(out))
            written.append(out / name)
    return written


def to_png(svg: Path) -> Path | None:
    png = svg.with_suffix(".png")
    if shutil.which("rsvg-convert"):
        subprocess.run(["rsvg-convert", "-o", str(png), str(svg)], check=True)
        return png
    try:
        import cairosvg  # type: ignore[import-not-found]
    except ImportError:
        return None
    cairosvg.svg2png(url=str(svg), write_to=str(png))
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100x32", help="terminal WIDTHxHEIGHT")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    for svg in asyncio.run(shoot(args.out, (width, height))):
        png = to_png(svg)
        print(svg, f"+ {png.name}" if png else "(no PNG converter found)")


if __name__ == "__main__":
    main()
