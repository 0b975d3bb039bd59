"""Check the built site as a reader sees it: python docs/check_pages.py [SITE_DIR]

Loads the lesson, how-it-works and diagrams pages (English and Chinese) in
headless Chromium at 1280 px and fails, naming the page, if a code block
scrolls sideways (a line cut off at the block's edge) or a diagram's text is
drawn smaller than 12 px. Mermaid scales a drawing wider than the page
down, text and all, inside a closed shadow root: so the check renders each
diagram's source again with the page's own Mermaid and compares its natural
width with the width it is given.

Strategy: a small local web server serves the site and, at one extra path,
a harness page that loads each page in a same-origin iframe of 1280 px,
measures it and writes the results as JSON into its own DOM, which Chromium
prints (--dump-dom). Exit 0 when every page passes, 1 when one does not, 2
when there is no Chromium or the harness did not report.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

log = logging.getLogger("check_pages")

#: The pages checked, relative to the site: where code and diagrams are.
PAGES = (["how-it-works/", "diagrams/", "zh/how-it-works/", "zh/diagrams/", "lessons/", "zh/lessons/"]
         + [f"{prefix}lessons/step{number:02d}/" for prefix in ("", "zh/") for number in range(12)])
WIDTH = 1280
#: The smallest diagram text a reader can read comfortably at that width.
MIN_TEXT_PX = 12.0
#: Mermaid's text size in the theme (Material's sequence diagrams, flowcharts' default).
TEXT_PX = 16.0
HARNESS = "__check_pages__.html"

HARNESS_HTML = """<!doctype html><html><body style="margin:0">
<iframe id="page" style="width:%(width)dpx;height:1600px;border:0"></iframe>
<pre id="out">pending</pre>
<script>
const frame = document.getElementById("page");
const pages = %(pages)s;
const sleep = ms => new Promise(done => setTimeout(done, ms));
function load(url) {
  return new Promise(done => { frame.onload = done; frame.src = url; });
}
async function measure(url) {
  await load(url);
  const raw = new DOMParser().parseFromString(await (await fetch(url)).text(), "text/html");
  const sources = [...raw.querySelectorAll(".mermaid")].map(element => element.textContent);
  const doc = frame.contentDocument, win = frame.contentWindow;
  for (let waited = 0; doc.querySelectorAll("div.mermaid").length < sources.length && waited < 10000; waited += 100)
    await sleep(100);
  const result = {page: url, scrolling: [], diagrams: []};
  doc.querySelectorAll("pre > code").forEach(code => {
    if (code.scrollWidth > code.clientWidth + 1) {
      const widest = code.textContent.split("\\n").reduce((a, b) => b.length > a.length ? b : a, "");
      result.scrolling.push(widest);
    }
  });
  const hosts = [...doc.querySelectorAll("div.mermaid")];
  for (let i = 0; i < sources.length; i++) {
    const {svg} = await win.mermaid.render("check_" + i, sources[i]);
    const natural = parseFloat((svg.match(/max-width:\\s*([\\d.]+)px/) || [0, "0"])[1]);
    const given = hosts[i] ? hosts[i].getBoundingClientRect().width : 0;
    result.diagrams.push({natural: natural, given: given});
  }
  return result;
}
(async () => {
  const results = [];
  for (const url of pages) {
    try { results.push(await measure(url)); }
    catch (error) { results.push({page: url, error: String(error)}); }
  }
  document.getElementById("out").textContent = JSON.stringify(results);
})();
</script></body></html>
"""


class Handler(http.server.SimpleHTTPRequestHandler):
    """The site's files, and the harness page at its own path."""

    harness = b""

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        if self.path.split("?")[0] == "/" + HARNESS:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(self.harness)))
            self.end_headers()
            self.wfile.write(self.harness)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


def chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return name
    return None


def problems(results: List[Dict]) -> List[str]:
    """One line for each code block that scrolls and each diagram drawn too small."""
    found = []
    for result in results:
        page = result["page"]
        if "error" in result:
            found.append(f"{page}: {result['error']}")
            continue
        for line in result["scrolling"]:
            found.append(f"{page}: a code block scrolls sideways at {WIDTH} px: {line.strip()[:80]!r}")
        for number, diagram in enumerate(result["diagrams"], 1):
            scale = min(1.0, diagram["given"] / diagram["natural"]) if diagram["natural"] else 0.0
            if TEXT_PX * scale < MIN_TEXT_PX:
                found.append(f"{page}: diagram {number} is {diagram['natural']:.0f} px wide in "
                             f"{diagram['given']:.0f} px: its text is {TEXT_PX * scale:.1f} px")
    return found


def run(site: Path, browser: str) -> Optional[List[Dict]]:
    """The harness's results for every page that exists, or None if it did not report."""
    pages = ["/" + page for page in PAGES if (site / page / "index.html").is_file()]
    Handler.harness = (HARNESS_HTML % {"width": WIDTH, "pages": json.dumps(pages)}).encode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{HARNESS}"
        budget = 15000 * len(pages)
        completed = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-extensions",
                                    "--no-first-run", f"--window-size={WIDTH},1600",
                                    f"--virtual-time-budget={budget}", "--dump-dom", url],
                                   capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
        server.server_close()
    match = re.search(r'<pre id="out">(.*?)</pre>', completed.stdout, re.DOTALL)
    if match is None or match.group(1) == "pending":
        return None
    return json.loads(html.unescape(match.group(1)))


def main(argv: List[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    site = Path(argv[1] if len(argv) > 1 else "site")
    browser = chromium()
    if browser is None:
        log.error("check_pages: no Chromium (chromium, chromium-browser or google-chrome) on PATH")
        return 2
    results = run(site, browser)
    if results is None:
        log.error("check_pages: the harness page did not report (Chromium failed or timed out)")
        return 2
    found = problems(results)
    for line in found:
        log.error("check_pages: %s", line)
    if found:
        return 1
    log.info("check_pages: %d pages at %d px: no code block scrolls, every diagram's text is %g px or more",
             len(results), WIDTH, MIN_TEXT_PX)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
