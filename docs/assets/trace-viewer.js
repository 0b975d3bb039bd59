/* The trace viewer: plays a trace written by `--trace-format jsonl`.
 *
 * How it works, in four steps, each a function below:
 *   1. parse()   the JSON lines, one event each (the schema is on the page);
 *   2. model()   groups the events by loop round, and finds the lanes: one
 *                per dispatcher (the listener first, then each pair);
 *   3. draw()    an SVG: the lanes are rows, the rounds are columns, and each
 *                cell shows what that dispatcher did in that round;
 *   4. the controls move a cursor over the rounds (step, play, pause), and
 *                the panel under the drawing lists the cursor round's events
 *                as the text trace would.
 * No library, no server: the page works offline, and from file:// once a
 * trace file is picked (browsers do not let a file:// page read other files).
 *
 * URL parameters: ?trace=URL loads that trace; &steps=N steps the cursor N
 * rounds on once it is loaded.  The state is written into the root element's
 * data- attributes (data-status, data-lanes, data-rounds, data-cursor), for
 * the tests that load the page in a headless browser.
 */
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var COLUMN = 34, ROW = 64, LEFT = 120, TOP = 34;  // sizes in pixels
  var HANDLER_CODES = {  // the short name each handle_* call gets in a cell
    handle_accept: "acc", handle_accepted: "new", handle_connect: "con", handle_connect_event: "con",
    handle_read: "rd", handle_write: "wr", handle_close: "hc", handle_expt: "ex", handle_expt_event: "ex",
    handle_error: "err", close: "cls"
  };

  // -- 1. parse -------------------------------------------------------------

  function parse(text) {
    var events = [];
    text.split("\n").forEach(function (line, index) {
      if (!line.trim()) { return; }
      var event;
      try { event = JSON.parse(line); } catch (error) {
        throw new Error("line " + (index + 1) + " is not JSON: " + error.message);
      }
      if (event.v !== 1) { throw new Error("line " + (index + 1) + ": schema version " + event.v + ", expected 1"); }
      events.push(event);
    });
    if (!events.length) { throw new Error("the file holds no events"); }
    return events;
  }

  // -- 2. model -------------------------------------------------------------

  function model(events) {
    var rounds = [], byNumber = {}, lanes = [], byName = {}, summary = null;
    events.forEach(function (event) {
      if (event.kind === "summary") { summary = event; return; }
      if (event.obj && !byName[event.obj]) {
        byName[event.obj] = {name: event.obj, fd: event.fd, listener: !!event.listener};
        lanes.push(byName[event.obj]);
      }
      if (event.obj && event.listener) { byName[event.obj].listener = true; }
      if (event.round === null || event.round === undefined) { return; }  // outside any round
      var round = byNumber[event.round];
      if (!round) {
        round = byNumber[event.round] = {number: event.round, t: event.t, events: [], wait: null};
        rounds.push(round);
      }
      round.events.push(event);
      if (event.kind === "wait") { round.wait = event; }
    });
    // Listener first, then the pairs, each pair together: receiver#1, sender#1, receiver#2...
    lanes.sort(function (a, b) {
      if (a.listener !== b.listener) { return a.listener ? -1 : 1; }
      var na = number(a.name), nb = number(b.name);
      return na !== nb ? na - nb : a.name.localeCompare(b.name);
    });
    lanes.forEach(function (lane, index) { lane.index = index; });
    lanes.forEach(function (lane) { lane.peer = peerOf(lane, lanes); });
    return {rounds: rounds, lanes: lanes, byName: byName, summary: summary};
  }

  function number(name) { return parseInt(name.split("#")[1], 10) || 0; }

  // A side's peer: the other dispatcher of the same number (receiver#2 <-> sender#2).
  function peerOf(lane, lanes) {
    if (lane.listener) { return null; }
    for (var i = 0; i < lanes.length; i++) {
      var other = lanes[i];
      if (other !== lane && !other.listener && number(other.name) === number(lane.name)) { return other; }
    }
    return null;
  }

  // -- the text of an event, as the text trace writes it ----------------------

  function line(event) {
    if (event.kind === "idle") { return "nothing to watch"; }
    if (event.kind === "wait") {
      var ready = event.ready || [];
      var text = event.call + "(" + (event.args || "") + ")";
      if (event.error) { return text + " raised " + event.error; }
      return text + " -> " + ready.length + " event" + (ready.length === 1 ? "" : "s") +
        (ready.length ? ": " + ready.map(function (p) { return "fd" + p[0] + " " + p[1]; }).join(", ") : "");
    }
    var call = "fd" + (event.fd === null || event.fd === undefined ? "-" : event.fd) + " " + event.obj + " " +
      event.call + "(" + (event.args || "") + ")";
    if (event.error && event.kind !== "io") { return call + " raised " + event.error; }
    if (event.result) { return call + " -> " + event.result + (event.why ? " (" + event.why + ")" : ""); }
    return call;
  }

  // The round's lines as the text trace writes them: a call is shown when it ends, with
  // its result; a call that others are made from is shown first, so that they sit under it.
  function detailLines(round) {
    var lines = [], pending = [];
    function add(event) {
      lines.push("+" + event.t.toFixed(3) + " r" + round.number + " " +
                 new Array((event.depth || 0) + 1).join("  ") + line(event));
    }
    round.events.forEach(function (event) {
      if (event.kind === "start") { pending.push({event: event, shown: false}); return; }
      if (event.kind === "io" && event.quiet) { return; }  // asyncore_fwd's sides: their handler says it
      if (event.kind === "end") {
        var call = pending.pop();
        if (call && call.shown && !(event.error || event.result)) { return; }
      }
      pending.forEach(function (outer) {
        if (!outer.shown) { outer.shown = true; add(outer.event); }
      });
      add(event);
    });
    return lines;
  }

  // -- 3. draw --------------------------------------------------------------

  function el(name, attributes, parent, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) { node.setAttribute(key, attributes[key]); });
    if (text !== undefined) { node.textContent = text; }
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function titled(node, text) { el("title", {}, node, text); return node; }

  function laneY(lane) { return TOP + lane.index * ROW; }

  function draw(trace, holder) {
    var width = LEFT + trace.rounds.length * COLUMN + 20, height = TOP + trace.lanes.length * ROW + 10;
    // The size in the style too: the theme scales SVGs in a page down to its width.
    var svg = el("svg", {width: width, height: height, "class": "tv-svg", role: "img",
                         style: "width:" + width + "px;height:" + height + "px;max-width:none",
                         "aria-label": "trace: " + trace.lanes.length + " lanes, " + trace.rounds.length + " rounds"});
    var defs = el("defs", {}, svg);
    ["data", "eof", "reset"].forEach(function (kind) {
      var marker = el("marker", {id: "tv-arrow-" + kind, viewBox: "0 0 10 10", refX: 9, refY: 5,
                                 markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse"}, defs);
      el("path", {d: "M0,0 L10,5 L0,10 z", "class": "tv-arrowhead tv-" + kind}, marker);
    });
    trace.lanes.forEach(function (lane) {
      var y = laneY(lane);
      el("rect", {x: 0, y: y, width: width, height: ROW, "class": "tv-lane" + (lane.index % 2 ? " tv-odd" : "")}, svg);
      titled(el("text", {x: 6, y: y + ROW / 2 + 4, "class": "tv-lane-name"}, svg, lane.name),
             lane.name + (lane.fd !== null && lane.fd !== undefined ? ", fd" + lane.fd : "") +
             (lane.listener ? ", the listener" : ""));
    });
    var cursor = el("rect", {x: LEFT, y: TOP - 26, width: COLUMN, height: height - TOP + 22, "class": "tv-cursor"}, svg);
    trace.rounds.forEach(function (round, column) { drawRound(trace, svg, round, column); });
    holder.textContent = "";
    holder.appendChild(svg);
    return {svg: svg, cursor: cursor};
  }

  function drawRound(trace, svg, round, column) {
    var x = LEFT + column * COLUMN;
    var label = el("text", {x: x + COLUMN / 2, y: 14, "class": "tv-round"}, svg, column % 5 === 0 ? round.number : "");
    titled(label, "round " + round.number + " at +" + round.t.toFixed(3) + " s");
    if (column && round.t - trace.rounds[column - 1].t >= 0.1) {  // a long wait: show how long
      el("text", {x: x, y: 26, "class": "tv-gap"}, svg, "+" + (round.t - trace.rounds[column - 1].t).toFixed(1) + "s");
    }
    // Whose descriptor each number is in this round: the first dispatcher seen with it
    // (numbers are reused: a closed socket's number goes to the next one opened).
    var owners = {};
    round.events.forEach(function (event) {
      if (event.obj && event.fd !== null && event.fd !== undefined && !(event.fd in owners)) {
        owners[event.fd] = trace.byName[event.obj];
      }
    });
    var handlers = {};  // lane name -> how many handler marks so far in this cell
    round.events.forEach(function (event) {
      var lane = event.obj && trace.byName[event.obj];
      if (!lane) { return; }
      var y = laneY(lane);
      if (event.kind === "end" && event.depth === 0 && (event.call === "readable" || event.call === "writable")) {
        var yes = event.result === "True", isRead = event.call === "readable";
        titled(el(isRead ? "circle" : "rect", isRead
          ? {cx: x + 9, cy: y + 9, r: 4, "class": "tv-pred " + (yes ? "tv-yes" : "tv-no")}
          : {x: x + 20, y: y + 5, width: 8, height: 8, "class": "tv-pred " + (yes ? "tv-yes-w" : "tv-no")}, svg),
               line(event));
      } else if (event.kind === "start" && HANDLER_CODES[event.call]) {
        var count = handlers[lane.name] = (handlers[lane.name] || 0) + 1;
        if (count <= 3) {
          titled(el("text", {x: x + 3 + event.depth * 3, y: y + 14 + count * 11,
                             "class": "tv-handler tv-" + HANDLER_CODES[event.call]}, svg,
                    HANDLER_CODES[event.call]), line(event));
        }
      } else if (event.kind === "io") {
        drawIo(svg, event, lane, x);
      }
    });
    (round.wait && round.wait.ready || []).forEach(function (pair) {
      var lane = owners[pair[0]];
      if (lane) {
        titled(el("rect", {x: x + 1, y: laneY(lane) + ROW - 9, width: COLUMN - 2, height: 6, "class": "tv-ready"}, svg),
               "the kernel: fd" + pair[0] + " " + pair[1]);
      }
    });
  }

  // A read moves data (or an EOF, or a reset) towards the peer: an arrow from this lane to the peer's.
  // A write sends it out of the process: a short tick on the lane itself.
  function drawIo(svg, event, lane, x) {
    var kind = event.result === "EOF" ? "eof" : event.result === "reset" ? "reset" : "data";
    var y = laneY(lane), reading = event.call !== "send";
    if (reading && lane.peer) {
      var down = lane.peer.index > lane.index;
      var y1 = y + (down ? ROW - 12 : 12), y2 = laneY(lane.peer) + (down ? 12 : ROW - 12);
      titled(el("line", {x1: x + COLUMN - 8, y1: y1, x2: x + COLUMN - 8, y2: y2, "class": "tv-io tv-" + kind,
                         "marker-end": "url(#tv-arrow-" + kind + ")"}, svg), line(event));
    } else {
      titled(el("line", {x1: x + COLUMN - 14, y1: y + ROW / 2, x2: x + COLUMN - 2, y2: y + ROW / 2,
                         "class": "tv-io tv-" + kind, "marker-end": "url(#tv-arrow-" + kind + ")"}, svg),
             line(event));
    }
  }

  // -- 4. the viewer: controls, cursor, details -------------------------------

  function Viewer(root) {
    this.root = root;
    this.trace = null;
    this.cursor = 0;
    this.timer = null;
    root.innerHTML =
      '<div class="tv-controls">' +
      '<label>' + text(root, "pick", "Trace file") + ' <input type="file" accept=".jsonl,.json,.txt" class="tv-file"></label> ' +
      '<select class="tv-examples"><option value="">' + text(root, "examples", "or an example…") + '</option></select> ' +
      '<button type="button" class="tv-back" title="previous round">◀</button>' +
      '<button type="button" class="tv-play">' + text(root, "play", "Play") + '</button>' +
      '<button type="button" class="tv-step" title="next round">▶</button> ' +
      '<label>' + text(root, "speed", "Rounds per second") + ' <select class="tv-speed">' +
      '<option>2</option><option selected>5</option><option>20</option></select></label>' +
      '</div>' +
      '<p class="tv-status" role="status"></p>' +
      '<div class="tv-drawing"></div>' +
      '<div class="tv-details"><p class="tv-details-title"></p><pre class="tv-lines"></pre></div>' +
      '<pre class="tv-summary"></pre>';
    this.status = root.querySelector(".tv-status");
    var self = this;
    var examples = root.querySelector(".tv-examples");
    (root.getAttribute("data-examples") || "").split(";").forEach(function (entry) {
      if (!entry.trim()) { return; }
      var parts = entry.split("|"), option = document.createElement("option");
      option.value = parts[0].trim();
      option.textContent = (parts[1] || parts[0]).trim();
      examples.appendChild(option);
    });
    examples.addEventListener("change", function () { if (examples.value) { self.load(examples.value); } });
    root.querySelector(".tv-file").addEventListener("change", function (event) {
      var file = event.target.files[0];
      if (!file) { return; }
      var reader = new FileReader();
      reader.onload = function () { self.show(String(reader.result), file.name); };
      reader.readAsText(file);
    });
    root.querySelector(".tv-step").addEventListener("click", function () { self.pause(); self.step(1); });
    root.querySelector(".tv-back").addEventListener("click", function () { self.pause(); self.step(-1); });
    root.querySelector(".tv-play").addEventListener("click", function () {
      if (self.timer) { self.pause(); } else { self.play(); }
    });
    root.setAttribute("data-status", "empty");
  }

  // The page's own words for the controls (data-text-NAME on the root), so the Chinese page can share this file.
  function text(root, name, fallback) {
    return root.getAttribute("data-text-" + name) || fallback;
  }

  Viewer.prototype.say = function (message, status) {
    this.status.textContent = message;
    this.root.setAttribute("data-status", status);
  };

  Viewer.prototype.load = function (url, then) {
    var self = this, request = new XMLHttpRequest();
    this.say(text(this.root, "loading", "Loading") + " " + url + "…", "loading");
    request.open("GET", url);
    request.onload = function () {
      if (request.status === 200 || (request.status === 0 && request.responseText)) {
        self.show(request.responseText, url);
        if (then) { then(); }
      } else {
        self.say(url + ": HTTP " + request.status, "error");
      }
    };
    request.onerror = function () {
      self.say(text(self.root, "file-url",
        "Could not read " + url + ". A page opened from file:// may not read other files: pick the trace file above."),
        "error");
    };
    request.send();
  };

  Viewer.prototype.show = function (content, name) {
    this.pause();
    try {
      this.trace = model(parse(content));
    } catch (error) {
      this.say(name + ": " + error.message, "error");
      return;
    }
    if (!this.trace.rounds.length) { this.say(name + ": no rounds in this trace", "error"); return; }
    this.drawing = draw(this.trace, this.root.querySelector(".tv-drawing"));
    var summary = this.trace.summary;
    this.root.querySelector(".tv-summary").textContent = summary ? summaryText(summary) : "";
    this.root.setAttribute("data-lanes", String(this.trace.lanes.length));
    this.root.setAttribute("data-rounds", String(this.trace.rounds.length));
    this.say(name + ": " + this.trace.lanes.length + " lanes, " + this.trace.rounds.length + " rounds", "ready");
    this.moveTo(0);
  };

  function summaryText(summary) {
    var lines = [summary.rounds + " rounds in " + summary.seconds.toFixed(3) + " s" +
                 (summary.rounds_per_second ? ", " + summary.rounds_per_second + " rounds/s" : "")];
    (summary.objects || []).forEach(function (o) {
      lines.push(o.obj + ": read " + o.read + " B, sent " + o.sent + " B" + (o.eof ? ", EOF" : "") +
                 (o.reset ? ", reset" : "") + "; paused " + o.paused.toFixed(3) + " s");
    });
    return lines.join("\n");
  }

  Viewer.prototype.moveTo = function (index) {
    var rounds = this.trace.rounds;
    this.cursor = Math.max(0, Math.min(rounds.length - 1, index));
    var round = rounds[this.cursor], x = LEFT + this.cursor * COLUMN;
    this.drawing.cursor.setAttribute("x", String(x));
    this.root.querySelector(".tv-details-title").textContent =
      text(this.root, "round", "Round {n}").replace("{n}", round.number) + " (+" + round.t.toFixed(3) + " s)";
    this.root.querySelector(".tv-lines").textContent = detailLines(round).join("\n");
    this.root.setAttribute("data-cursor", String(round.number));
    this.root.setAttribute("data-cursor-index", String(this.cursor));
    this.root.setAttribute("data-cursor-x", String(x));
    var drawing = this.root.querySelector(".tv-drawing");  // keep the cursor in view
    if (x < drawing.scrollLeft + LEFT || x > drawing.scrollLeft + drawing.clientWidth - COLUMN) {
      drawing.scrollLeft = Math.max(0, x - drawing.clientWidth / 2);
    }
  };

  Viewer.prototype.step = function (by) {
    if (!this.trace) { return false; }
    var before = this.cursor;
    this.moveTo(this.cursor + by);
    return this.cursor !== before;
  };

  Viewer.prototype.play = function () {
    if (!this.trace) { return; }
    var self = this, speed = parseFloat(this.root.querySelector(".tv-speed").value) || 5;
    if (this.cursor === this.trace.rounds.length - 1) { this.moveTo(0); }
    this.root.querySelector(".tv-play").textContent = text(this.root, "pause", "Pause");
    this.timer = setInterval(function () { if (!self.step(1)) { self.pause(); } }, 1000 / speed);
  };

  Viewer.prototype.pause = function () {
    if (this.timer) { clearInterval(this.timer); }
    this.timer = null;
    this.root.querySelector(".tv-play").textContent = text(this.root, "play", "Play");
  };

  function start() {
    var root = document.getElementById("trace-player");
    if (!root) { return; }
    var viewer = new Viewer(root), params = new URLSearchParams(window.location.search);
    var url = params.get("trace") || root.getAttribute("data-default-trace");
    var steps = parseInt(params.get("steps") || "0", 10) || 0;
    if (url) {
      viewer.load(url, function () { for (var i = 0; i < steps; i++) { viewer.step(1); } });
    }
    window.traceViewer = viewer;  // for the curious, from the browser's console
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
