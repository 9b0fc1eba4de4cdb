"""Synthetic, natural-looking detector inputs and YOLOX post-processing (tests and benchmarks).

``text_scene(rng)`` renders, with numpy only, a captcha-like picture: a smooth photographic
background (low-frequency colour fields and gradients), translucent shapes, interference
lines, and a few characters (a 5x7 bitmap font for A-Z / 0-9, and random-stroke glyphs that
look like CJK characters) of random size, colour, rotation and shear, with an outline and
mild blur and noise. ``detector_input`` prepares it as ddddocr's detector expects (BGR
0..255 float32, CHW, letterboxed into 416x416 with the padding value 114).

``yolox_detections`` decodes a YOLOX head output ``[1, n, 5 + classes]`` (strides 8/16/32)
and applies class-agnostic NMS, as ddddocr does; ``compare_detections`` matches two sets.
"""

from __future__ import annotations

import numpy as np

_FONT = {  # 5x7, one string of 7 rows of 5 bits per glyph
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
}
_GLYPHS = {k: np.array([[int(b) for b in row] for row in v.split()], dtype=np.float32) for k, v in _FONT.items()}


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: a coarse random grid, bilinearly upsampled."""
    gh, gw = cells + 1, max(2, int(cells * w / h) + 1)
    grid = rng.random((gh, gw)).astype(np.float32)
    y = np.linspace(0, gh - 1, h, dtype=np.float32)
    x = np.linspace(0, gw - 1, w, dtype=np.float32)
    y0 = np.minimum(y.astype(int), gh - 2)
    x0 = np.minimum(x.astype(int), gw - 2)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx).astype(np.float32)


def _blur(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, 1, mode="edge")
    return (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:] + 2 * p[1:-1, :-2] + 4 * p[1:-1, 1:-1] + 2 * p[1:-1, 2:]
            + p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) / 16.0


def _cjk_glyph(rng: np.random.Generator) -> np.ndarray:
    """Random strokes on a 12x12 grid: horizontal, vertical and diagonal bars, like a CJK character."""
    g = np.zeros((12, 12), np.float32)
    for _ in range(rng.integers(4, 9)):
        kind = rng.integers(0, 4)
        a, b = sorted(rng.integers(1, 11, 2))
        c = rng.integers(1, 11)
        if kind == 0:
            g[c, a:b + 2] = 1
        elif kind == 1:
            g[a:b + 2, c] = 1
        else:
            n = b - a + 2
            for i in range(n):
                col = c + (i if kind == 2 else -i) // 2
                if 0 <= a + i < 12 and 0 <= col < 12:
                    g[a + i, col] = 1
    return g


def _stamp(img: np.ndarray, mask_src: np.ndarray, cy: float, cx: float, size: float, angle: float, shear: float,
           color: np.ndarray, outline: np.ndarray | None) -> tuple[int, int, int, int]:
    """Draw a bitmap glyph centred at (cy, cx), ``size`` pixels tall; returns its box (x0, y0, x1, y1)."""
    h, w = img.shape[:2]
    gh, gw = mask_src.shape
    half = int(size * 0.75) + 2
    y0, y1 = max(0, int(cy) - half), min(h, int(cy) + half)
    x0, x1 = max(0, int(cx) - half), min(w, int(cx) + half)
    if y1 <= y0 or x1 <= x0:
        return (0, 0, 0, 0)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(-angle), np.sin(-angle)
    ry, rx = ca * dy - sa * dx, sa * dy + ca * dx
    rx = rx - shear * ry
    scale = size / gh
    sy = ry / scale + gh / 2
    sx = rx / scale + gw / 2
    inside = (sy >= 0) & (sy < gh) & (sx >= 0) & (sx < gw)
    m = np.zeros_like(sy)
    m[inside] = mask_src[sy[inside].astype(int), sx[inside].astype(int)]
    m = _blur(m)
    region = img[y0:y1, x0:x1]
    if outline is not None:
        o = np.clip(_blur(_blur(m)) * 3.0, 0, 1)
        region[:] = region * (1 - o[..., None]) + outline * o[..., None]
    region[:] = region * (1 - m[..., None]) + color * m[..., None]
    ys, xs = np.nonzero(m > 0.3)
    if ys.size == 0:
        return (0, 0, 0, 0)
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)


def text_scene(rng: np.random.Generator, height: int | None = None, width: int | None = None) -> tuple[np.ndarray, list]:
    """(BGR uint8 image (h, w, 3), character boxes) of a captcha-like scene."""
    h = int(height or rng.integers(120, 400))
    w = int(width or rng.integers(200, 480))
    base = np.stack([_smooth_field(rng, h, w, int(rng.integers(2, 6))) for _ in range(3)], axis=2)
    tint = rng.random(3).astype(np.float32)
    img = (60 + 150 * (0.6 * base + 0.4 * tint)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img += (rng.random(3) * 60 - 30).astype(np.float32) * (xx / w)[..., None]  # lighting gradient
    for _ in range(rng.integers(2, 7)):  # translucent shapes
        col = rng.random(3).astype(np.float32) * 255
        alpha = float(rng.uniform(0.2, 0.6))
        if rng.random() < 0.5:
            cy, cx, r = rng.random() * h, rng.random() * w, rng.uniform(10, min(h, w) / 2)
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        else:
            ya, yb = sorted(rng.integers(0, h, 2))
            xa, xb = sorted(rng.integers(0, w, 2))
            m = np.zeros((h, w), np.float32)
            m[ya:yb + 1, xa:xb + 1] = 1
        m = _blur(m) * alpha
        img = img * (1 - m[..., None]) + col * m[..., None]
    boxes = []
    n_chars = int(rng.integers(3, 7))
    size = float(rng.uniform(22, 60))
    x = float(rng.uniform(5, max(6, w * 0.2)))
    cy = float(rng.uniform(size * 0.7, max(size * 0.7 + 1, h - size * 0.7)))
    keys = list(_GLYPHS)
    for _ in range(n_chars):
        glyph = _GLYPHS[keys[rng.integers(len(keys))]] if rng.random() < 0.5 else _cjk_glyph(rng)
        s = size * float(rng.uniform(0.8, 1.2))
        color = rng.random(3).astype(np.float32) * 255
        outline = (255 - color) if rng.random() < 0.6 else None
        b = _stamp(img, glyph, cy + rng.normal(0, size * 0.15), x + s / 2, s, float(rng.normal(0, 0.35)),
                   float(rng.normal(0, 0.15)), color, outline)
        if b[2] > b[0]:
            boxes.append(b)
        x += s * float(rng.uniform(0.9, 1.6))
        if x > w - s / 2:
            break
    for _ in range(rng.integers(1, 5)):  # interference curves
        col = rng.random(3).astype(np.float32) * 255
        t = np.linspace(0, 1, 4 * w)
        py = rng.uniform(0, h) + rng.uniform(-h / 3, h / 3) * np.sin(2 * np.pi * (rng.uniform(0.3, 2) * t + rng.random()))
        px = t * w
        ok = (py >= 0) & (py < h - 1)
        img[py[ok].astype(int), np.minimum(px[ok].astype(int), w - 1)] = col
    img += rng.normal(0, rng.uniform(1, 6), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def letterbox(img: np.ndarray, size: int = 416) -> tuple[np.ndarray, float]:
    """ddddocr's ``preproc``: resize (bilinear) to fit, pad with 114, CHW float32."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nh, nw = max(1, int(h * r)), max(1, int(w * r))
    ys = np.clip((np.arange(nh) + 0.5) / r - 0.5, 0, h - 1)
    xs = np.clip((np.arange(nw) + 0.5) / r - 0.5, 0, w - 1)
    y0, x0 = ys.astype(int), xs.astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    f = img.astype(np.float32)
    resized = (f[y0][:, x0] * (1 - fy) * (1 - fx) + f[y0][:, x1] * (1 - fy) * fx
               + f[y1][:, x0] * fy * (1 - fx) + f[y1][:, x1] * fy * fx)
    out = np.full((size, size, 3), 114, np.uint8)
    out[:nh, :nw] = np.clip(resized, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32), r


def detector_inputs(n: int, seed: int = 0, size: int = 416) -> list[np.ndarray]:
    """``n`` letterboxed scenes, each float32 [1, 3, size, size]."""
    rng = np.random.default_rng(seed)
    return [letterbox(text_scene(rng)[0], size)[0][None] for _ in range(n)]


# --------------------------------------------------------------------------- YOLOX post-processing


def yolox_decode(out: np.ndarray, size: int = 416, strides=(8, 16, 32)) -> np.ndarray:
    """Raw head output [1, n, 5+c] -> [n, 5+c] with boxes as centre x, y, width, height in pixels."""
    o = np.array(out[0], dtype=np.float64)
    grids, mult = [], []
    for s in strides:
        k = size // s
        xv, yv = np.meshgrid(np.arange(k), np.arange(k))
        grids.append(np.stack([xv, yv], 2).reshape(-1, 2))
        mult.append(np.full((k * k, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(mult)
    o[:, :2] = (o[:, :2] + grid) * stride
    o[:, 2:4] = np.exp(np.minimum(o[:, 2:4], 30.0)) * stride
    return o


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def yolox_detections(out: np.ndarray, score_thr: float = 0.1, nms_thr: float = 0.45, size: int = 416) -> np.ndarray:
    """[k, 5] boxes (x0, y0, x1, y1, score) after class-agnostic NMS, best first (as ddddocr)."""
    d = yolox_decode(out, size)
    scores = d[:, 4] * d[:, 5:].max(axis=1)
    xyxy = np.stack([d[:, 0] - d[:, 2] / 2, d[:, 1] - d[:, 3] / 2, d[:, 0] + d[:, 2] / 2, d[:, 1] + d[:, 3] / 2], 1)
    keep = scores > score_thr
    xyxy, scores = xyxy[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    picked = []
    while order.size:
        i = order[0]
        picked.append(i)
        rest = order[1:]
        order = rest[_iou(xyxy[i], xyxy[rest]) <= nms_thr]
    return np.concatenate([xyxy[picked], scores[picked, None]], axis=1) if picked else np.zeros((0, 5))


def compare_detections(ref: np.ndarray, test: np.ndarray, iou_thr: float = 0.5) -> dict:
    """Greedy one-to-one matching (best IoU first): matched count, IoUs of the pairs."""
    ious = []
    used = np.zeros(len(test), bool)
    for b in ref:
        if not len(test):
            break
        iou = _iou(b[:4], test[:, :4])
        iou[used] = -1
        j = int(np.argmax(iou))
        if iou[j] >= iou_thr:
            used[j] = True
            ious.append(float(iou[j]))
    return {"ref": len(ref), "test": len(test), "matched": len(ious), "ious": ious}
