// The live loss curve: each trained chunk's loss before and after its update, drawn in an SVG as it arrives.

const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 240, PAD = { left: 44, right: 12, top: 12, bottom: 26 };

function element(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  parent?.appendChild(node);
  return node;
}

const format = (value) => (value === null || !Number.isFinite(value) ? "not measured" : value.toFixed(3));

export class LossCurve {
  constructor(svg, summary) {
    this.svg = svg;
    this.summary = summary;
    this.clear();
    new ResizeObserver(() => this.draw()).observe(svg);
  }

  clear() {
    this.points = []; // {index, before, after, tokensPerSecond}
    this.draw();
  }

  add(chunk) {
    this.points.push({ index: chunk.index, before: chunk.loss_before, after: chunk.loss_after,
                       tokensPerSecond: chunk.tokens_per_second });
    this.draw();
  }

  draw() {
    this.svg.replaceChildren();
    const points = this.points;
    const losses = points.flatMap((p) => [p.before, p.after]).filter((v) => v !== null && Number.isFinite(v));
    if (!losses.length) {
      this.summary.textContent = points.length ? `${points.length} chunks, none with a loss` : "No chunk trained yet.";
      return;
    }
    const WIDTH = Math.max(200, Math.round(this.svg.clientWidth || 640)); // drawn at its size: text unstretched
    this.svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    let low = Math.min(...losses), high = Math.max(...losses);
    if (high - low < 1e-6) { low -= 0.5; high += 0.5; }
    const first = points[0].index, last = Math.max(points[points.length - 1].index, first + 1);
    const x = (i) => PAD.left + ((i - first) / (last - first)) * (WIDTH - PAD.left - PAD.right);
    const y = (v) => PAD.top + ((high - v) / (high - low)) * (HEIGHT - PAD.top - PAD.bottom);

    const axes = element("g", { class: "axes" }, this.svg);
    element("line", { x1: PAD.left, y1: HEIGHT - PAD.bottom, x2: WIDTH - PAD.right, y2: HEIGHT - PAD.bottom }, axes);
    element("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: HEIGHT - PAD.bottom }, axes);
    for (const [value, at] of [[high, y(high)], [low, y(low)]]) {
      element("text", { x: PAD.left - 6, y: at + 4, "text-anchor": "end" }, axes).textContent = value.toFixed(2);
    }
    element("text", { x: WIDTH - PAD.right, y: HEIGHT - 6, "text-anchor": "end" }, axes).textContent =
      `chunk ${points[points.length - 1].index}`;

    for (const kind of ["before", "after"]) {
      const shown = points.filter((p) => p[kind] !== null && Number.isFinite(p[kind]));
      element("polyline", { class: `line ${kind}`, points: shown.map((p) => `${x(p.index)},${y(p[kind])}`).join(" ") },
              this.svg);
      for (const p of shown) {
        const dot = element("circle", { class: `point ${kind}`, cx: x(p.index), cy: y(p[kind]), r: 3,
                                        "data-index": p.index }, this.svg);
        element("title", {}, dot).textContent = `chunk ${p.index}: ${kind} ${format(p[kind])}`;
      }
    }
    const latest = points[points.length - 1];
    this.summary.textContent = `${points.length} chunks; last: ${format(latest.before)} before, ` +
      `${format(latest.after)} after; ` +
      `${Math.round(latest.tokensPerSecond)} tokens/s`;
  }
}
