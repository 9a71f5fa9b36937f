// The pitch: a 105 x 68 m football pitch on a canvas and one tracking frame drawn on it.
//
// A tracking frame (docs/vendor-protocol.md) has `hm` and `aw` (the two teams), `rf` (the
// referees), each a list of {jn: jersey number, ro: role, pn: [x, y]}, and `ba` (the ball,
// pn: [x, y, z]). Coordinates are metres from the centre spot: x along the length
// (-52.5..52.5), y across (-34..34, drawn upwards).

export const LENGTH = 105;
export const WIDTH = 68;
const MARGIN = 3; // metres of grass drawn around the lines

const COLOURS = {
  grass: "#2f7d3b",
  stripe: "#2b7336",
  line: "rgba(255,255,255,0.85)",
  home: "#e5484d",
  homeKeeper: "#9d1c20",
  away: "#3e8ef7",
  awayKeeper: "#1a4fa0",
  ref: "#f5d90a",
  ball: "#ffffff",
};

export class Pitch {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.scale = canvas.width / (LENGTH + 2 * MARGIN);
    canvas.height = Math.round((WIDTH + 2 * MARGIN) * this.scale);
    this.drawEmpty();
  }

  // Canvas pixels of a pitch position (metres from the centre spot, y up).
  px(x, y) {
    return [(x + LENGTH / 2 + MARGIN) * this.scale, (WIDTH / 2 + MARGIN - y) * this.scale];
  }

  drawEmpty() {
    const { ctx, canvas, scale } = this;
    ctx.fillStyle = COLOURS.grass;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = COLOURS.stripe;
    for (let i = 0; i < 14; i += 2) {
      const [x0] = this.px(-LENGTH / 2 + (i * LENGTH) / 14, 0);
      ctx.fillRect(x0, 0, (LENGTH / 14) * scale, canvas.height);
    }
    ctx.strokeStyle = COLOURS.line;
    ctx.lineWidth = Math.max(1.5, 0.12 * scale);
    const rect = (x0, y0, x1, y1) => {
      const [a, b] = this.px(x0, y1);
      const [c, d] = this.px(x1, y0);
      ctx.strokeRect(a, b, c - a, d - b);
    };
    const circle = (x, y, r, from = 0, to = 2 * Math.PI, fill = false) => {
      const [cx, cy] = this.px(x, y);
      ctx.beginPath();
      ctx.arc(cx, cy, r * scale, from, to);
      if (fill) {
        ctx.fillStyle = COLOURS.line;
        ctx.fill();
      } else {
        ctx.stroke();
      }
    };
    const hl = LENGTH / 2;
    rect(-hl, -WIDTH / 2, hl, WIDTH / 2); // touchlines and goal lines
    const [mx, my0] = this.px(0, WIDTH / 2);
    const [, my1] = this.px(0, -WIDTH / 2);
    ctx.beginPath();
    ctx.moveTo(mx, my0);
    ctx.lineTo(mx, my1);
    ctx.stroke();
    circle(0, 0, 9.15);
    circle(0, 0, 0.25, 0, 2 * Math.PI, true);
    for (const side of [-1, 1]) {
      const goal = side * hl;
      rect(Math.min(goal, goal - side * 16.5), -20.16, Math.max(goal, goal - side * 16.5), 20.16);
      rect(Math.min(goal, goal - side * 5.5), -9.16, Math.max(goal, goal - side * 5.5), 9.16);
      rect(Math.min(goal, goal + side * 2), -3.66, Math.max(goal, goal + side * 2), 3.66);
      const spot = goal - side * 11;
      circle(spot, 0, 0.25, 0, 2 * Math.PI, true);
      // The arc of the penalty area: the part of the 9.15 m circle outside the area.
      const a = Math.acos(5.5 / 9.15);
      if (side < 0) circle(spot, 0, 9.15, -a, a);
      else circle(spot, 0, 9.15, Math.PI - a, Math.PI + a);
    }
  }

  // Draw one tracking frame (an object as the vendor sent it). Missing parts are skipped.
  draw(frame) {
    this.drawEmpty();
    const team = (list, colour, keeper) => {
      for (const p of Array.isArray(list) ? list : []) {
        this.person(p, p && p.ro === 1 ? keeper : colour, p && p.jn > 0 ? String(p.jn) : "");
      }
    };
    team(frame.hm, COLOURS.home, COLOURS.homeKeeper);
    team(frame.aw, COLOURS.away, COLOURS.awayKeeper);
    for (const r of Array.isArray(frame.rf) ? frame.rf : []) {
      this.person(r, COLOURS.ref, r && r.ro === 3 ? "R" : "A", "#111");
    }
    this.ball(frame.ba);
  }

  person(p, colour, label, textColour = "#fff") {
    if (!p || !Array.isArray(p.pn) || p.pn.length < 2) return;
    const { ctx, scale } = this;
    const [x, y] = this.px(Number(p.pn[0]), Number(p.pn[1]));
    const r = 1.5 * scale;
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = colour;
    ctx.fill();
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "rgba(0,0,0,0.55)";
    ctx.stroke();
    if (label) {
      ctx.fillStyle = textColour;
      ctx.font = `bold ${Math.round(r * 1.05)}px system-ui, sans-serif`;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(label, x, y + 0.5);
    }
  }

  ball(ba) {
    if (!ba || !Array.isArray(ba.pn) || ba.pn.length < 2) return;
    const { ctx, scale } = this;
    const [x, y] = this.px(Number(ba.pn[0]), Number(ba.pn[1]));
    const z = Number(ba.pn[2]) || 0;
    // Higher balls are drawn larger, with their shadow on the grass.
    const r = (0.7 + Math.min(z, 10) * 0.1) * scale;
    ctx.beginPath();
    ctx.arc(x + z * 0.3 * scale, y + z * 0.3 * scale, 0.5 * scale, 0, 2 * Math.PI);
    ctx.fillStyle = "rgba(0,0,0,0.3)";
    ctx.fill();
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = COLOURS.ball;
    ctx.fill();
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "#000";
    ctx.stroke();
  }
}
