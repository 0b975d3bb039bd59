"""The trace viewer (docs/trace-viewer.md, docs/assets/trace-viewer.js) and the traces it plays.

The viewer is loaded in headless Chromium from a small local web server,
with the page's own markup, script and the lessons' recorded traces: it
must draw one lane per dispatcher and move its cursor as it steps.  The
recorded traces must still look like a fresh recording, and say only what
the page's schema documents; each lesson page links its trace.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import importlib.util
import json
import re
import shutil
import subprocess
import threading
import types
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
TRACES = DOCS / "assets" / "traces"
STEPS = (1, 5, 7, 10)
COLUMN, LEFT = 34, 120  # trace-viewer.js's sizes: a round's column, and the lane names' width


def recorder() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("record_traces", ROOT / "examples" / "lessons" / "record_traces.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def events_of(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- the recorded traces ----------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_recorded_trace_looks_like_a_fresh_recording(step: int, tmp_path: Path) -> None:
    """The trace kept in docs/ has the lanes, calls, answers and marks a recording made now has.
    When this fails: python examples/lessons/record_traces.py, and look at the viewer."""
    module = recorder()
    fresh = tmp_path / f"step{step:02d}.jsonl"
    module.record(step, fresh)
    kept = TRACES / f"step{step:02d}.jsonl"
    with kept.open(encoding="utf-8") as old, fresh.open(encoding="utf-8") as new:
        kept_shape, fresh_shape = module.shape(old), module.shape(new)
    assert kept_shape == fresh_shape, (f"only in the kept trace: {sorted(kept_shape - fresh_shape)}; "
                                       f"only in a fresh one: {sorted(fresh_shape - kept_shape)}")


def documented_fields() -> Set[str]:
    """The fields the viewer page's schema table lists: its rows' first cells."""
    text = (DOCS / "trace-viewer.md").read_text(encoding="utf-8")
    table = text[text.index("| field | in | meaning |"):]
    return set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))


def documented_kinds() -> Set[str]:
    text = (DOCS / "trace-viewer.md").read_text(encoding="utf-8")
    table = text[text.index("| kind | what happened |"):text.index("| field | in | meaning |")]
    return set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))


@pytest.mark.parametrize("step", STEPS)
def test_recorded_trace_says_only_what_the_schema_documents(step: int) -> None:
    """Version 1 on every line, meta first and summary last, and no field or kind the page does not explain."""
    events = events_of(TRACES / f"step{step:02d}.jsonl")
    assert {event["v"] for event in events} == {1}
    assert events[0]["kind"] == "meta" and events[-1]["kind"] == "summary"
    fields, kinds = documented_fields(), documented_kinds()
    assert kinds == {"meta", "start", "end", "io", "wait", "idle", "summary"}
    for event in events:
        assert event["kind"] in kinds, event
        assert set(event) <= fields, sorted(set(event) - fields)
    for entry in events[-1]["objects"]:
        assert set(entry) == {"obj", "fd", "read", "sent", "eof", "reset", "paused"}


def test_the_chinese_page_documents_the_same_fields() -> None:
    text = (DOCS / "zh" / "trace-viewer.md").read_text(encoding="utf-8")
    table = text[text.index("| 字段 | 出现在 | 含义 |"):]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)) == documented_fields()


@pytest.mark.parametrize("language", ["", "zh/"])
@pytest.mark.parametrize("step", STEPS)
def test_lesson_page_links_its_trace_in_the_viewer(step: int, language: str) -> None:
    page = (DOCS / language / "lessons" / f"step{step:02d}.md").read_text(encoding="utf-8")
    up = "../../" if language else "../"
    assert f"trace-viewer.md?trace={up}assets/traces/step{step:02d}.jsonl" in page


# -- the viewer in a browser ------------------------------------------------------------


def chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The viewer page (its markup from docs/trace-viewer.md), its script and the traces,
    laid out as in the built site and served on 127.0.0.1; yields the page's URL."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(DOCS / "assets" / "traces", root / "assets" / "traces")
    for name in ("trace-viewer.js", "trace-viewer.css"):
        shutil.copy(DOCS / "assets" / name, root / "assets" / name)
    page = (DOCS / "trace-viewer.md").read_text(encoding="utf-8")
    markup = page[page.index("<link rel"):page.index("</script>") + len("</script>")]
    (root / "trace-viewer").mkdir()
    (root / "trace-viewer" / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'></head><body>{markup}</body></html>", encoding="utf-8")
    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/trace-viewer/"
    server.shutdown()
    server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class ViewerState(html.parser.HTMLParser):
    """From the DOM Chromium dumps: the viewer root's data- attributes, the lane names, the cursor's x."""

    def __init__(self) -> None:
        super().__init__()
        self.root: Dict[str, str] = {}
        self.lane_names: List[str] = []
        self.cursor_x: Optional[str] = None
        self._in_lane_name = False

    def handle_starttag(self, tag: str, attrs: List[tuple]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        classes = attributes.get("class", "").split()
        if attributes.get("id") == "trace-player":
            self.root = {key[5:]: value for key, value in attributes.items() if key.startswith("data-")}
        elif tag == "text" and "tv-lane-name" in classes:
            self._in_lane_name = True
        elif tag == "rect" and "tv-cursor" in classes:
            self.cursor_x = attributes.get("x")

    def handle_data(self, data: str) -> None:
        if self._in_lane_name and data.strip():
            self.lane_names.append(data.strip())
            self._in_lane_name = False


def view(url: str) -> ViewerState:
    """Load the URL in headless Chromium, let its scripts run, and read the resulting DOM."""
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium (chromium, chromium-browser or google-chrome) on PATH: "
                    ".ci/run installs it with apt-get")
    result = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-extensions",
                             "--no-first-run", "--virtual-time-budget=10000", "--dump-dom", url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    state = ViewerState()
    state.feed(result.stdout)
    return state


def lanes_and_rounds(step: int) -> tuple:
    events = events_of(TRACES / f"step{step:02d}.jsonl")
    lanes = {event["obj"] for event in events if event.get("obj")}
    rounds = sorted({event["round"] for event in events if event.get("round") is not None})
    return lanes, rounds


@pytest.mark.parametrize("step", STEPS)
def test_viewer_draws_a_lane_per_dispatcher(site: str, step: int) -> None:
    """Loaded with a lesson's trace, the viewer is ready, with one lane per dispatcher and every round."""
    state = view(f"{site}?trace=../assets/traces/step{step:02d}.jsonl")
    lanes, rounds = lanes_and_rounds(step)
    assert state.root.get("status") == "ready", state.root
    assert state.root.get("lanes") == str(len(lanes))
    assert sorted(state.lane_names) == sorted(lanes)
    assert state.root.get("rounds") == str(len(rounds))
    assert state.root.get("cursor") == str(rounds[0]) and state.cursor_x == str(LEFT)


@pytest.mark.parametrize("step", STEPS)
def test_stepping_moves_the_cursor(site: str, step: int) -> None:
    """?steps=3: the cursor is on the fourth round, three columns on."""
    state = view(f"{site}?trace=../assets/traces/step{step:02d}.jsonl&steps=3")
    _, rounds = lanes_and_rounds(step)
    assert state.root.get("status") == "ready", state.root
    assert state.root.get("cursor-index") == "3"
    assert state.root.get("cursor") == str(rounds[3])
    assert state.cursor_x == str(LEFT + 3 * COLUMN)


def test_a_trace_that_is_not_json_lines_is_an_error_shown(site: str, tmp_path: Path) -> None:
    """A file that is not a trace: the viewer says so, and draws nothing."""
    state = view(f"{site}?trace=index.html")
    assert state.root.get("status") == "error"
    assert not state.lane_names
