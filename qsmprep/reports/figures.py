"""Report figures: slice mosaics of maps with outlines, curves; deterministic SVG/PNG bytes.

Mosaics show the image in the closest canonical (RAS) orientation, neurological convention
(left hemisphere on the left of axial and coronal slices): one row of axial, one of coronal
and one of sagittal slices, spread evenly over the mask's extent and cropped to it. Every
pixel is composed here (colour map, outlines) and drawn with one ``imshow`` per row, so the
files depend only on the data. SVG files are written with a fixed ``svg.hashsalt`` and no
date; PNG files without metadata.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger("qsmprep")

#: Settings that make matplotlib's output independent of the machine and the time.
RC = {
    "svg.hashsalt": "qsmprep",
    "svg.fonttype": "none",  # text stays text (selectable, no glyph paths that vary by font)
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "image.interpolation": "nearest",
    "path.simplify": False,
}

BACKGROUND = (0.06, 0.06, 0.08)  # outside the mask and between tiles
OUTLINE_COLOURS = {"mask": (1.0, 0.25, 0.1), "qsm": (0.15, 0.85, 1.0)}


@dataclass
class Layer:
    """One image to show: the data [x, y, z] (RAS), its window, colour map and label."""

    data: np.ndarray
    vmin: float
    vmax: float
    cmap: str = "gray"
    label: str = ""  # colour bar label (with units); empty: no colour bar
    mask: np.ndarray | None = None  # voxels outside are painted BACKGROUND


@dataclass
class Outline:
    """Outlines to draw on a layer: a binary mask, or a label image (one colour per label)."""

    labels: np.ndarray  # int [x, y, z]; 0 = background
    colour: tuple[float, float, float] | None = None  # None: one colour per label
    name: str = ""


def _matplotlib():
    """matplotlib and its ``Figure`` class: figures are made without pyplot, so no backend
    is selected, no global figure list grows, and an interactive session is left alone."""
    import matplotlib
    import matplotlib.cm  # noqa: F401  (ScalarMappable for colour bars)
    from matplotlib.figure import Figure

    return matplotlib, Figure


def save_figure(figure, path: Path, *, formats: Sequence[str] = ("svg",)) -> list[Path]:
    """Write ``figure`` as deterministic SVG (and/or PNG) next to ``path`` (suffix replaced);
    atomic (temporary file + rename). Returns the written paths."""
    matplotlib, Figure = _matplotlib()
    written = []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        buffer = io.BytesIO()
        with matplotlib.rc_context(RC):
            if fmt == "svg":
                figure.savefig(buffer, format="svg", metadata={"Date": None})
            elif fmt == "png":
                figure.savefig(buffer, format="png", dpi=110,
                               metadata={"Software": None})
            else:
                raise ValueError(f"unsupported figure format {fmt!r} (svg or png)")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, target)
        written.append(target)
    return written


# ---------------------------------------------------------------------------------------
# mosaics
# ---------------------------------------------------------------------------------------
def slice_positions(extent_mask: np.ndarray, axis: int, count: int) -> list[int]:
    """``count`` slice indices along ``axis`` spread evenly over the mask's extent (10-90%)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(extent_mask.any(axis=other))
    if present.size == 0:
        present = np.arange(extent_mask.shape[axis])
    first, last = int(present[0]), int(present[-1])
    span = last - first
    fractions = np.linspace(0.1, 0.9, count) if count > 1 else np.asarray([0.5])
    positions = np.round(first + span * fractions).astype(int)
    return sorted(set(int(p) for p in positions))


def _bounding_box(extent_mask: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    if not extent_mask.any():
        return tuple(slice(0, n) for n in extent_mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(extent_mask.any(axis=other))
        box.append(slice(max(int(present[0]) - margin, 0),
                         min(int(present[-1]) + margin + 1, extent_mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A slice as displayed (rows top to bottom, columns left to right)."""
    plane = np.take(volume, index, axis=axis)
    return np.flipud(plane.T)


def _rgb(layer: Layer, volume_mask: np.ndarray | None) -> np.ndarray:
    """Colour-mapped RGB [x, y, z, 3] float32 of a layer (BACKGROUND outside its mask)."""
    matplotlib, _ = _matplotlib()
    cmap = matplotlib.colormaps[layer.cmap]
    span = float(layer.vmax - layer.vmin) or 1.0
    scaled = np.clip((np.nan_to_num(layer.data.astype(np.float64)) - layer.vmin) / span, 0, 1)
    lut = cmap(np.linspace(0, 1, 256))[:, :3].astype(np.float32)
    rgb = lut[np.round(scaled * 255).astype(np.int16)]
    mask = layer.mask if layer.mask is not None else volume_mask
    if mask is not None:
        rgb[~mask] = BACKGROUND
    return rgb


def _outline_2d(labels: np.ndarray) -> np.ndarray:
    """Label of each boundary pixel of a 2D label image (0 elsewhere)."""
    inner = np.ones(labels.shape, bool)
    padded = np.pad(labels, 1, mode="constant")
    for shift in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        neighbour = padded[1 + shift[0]:padded.shape[0] - 1 + shift[0],
                           1 + shift[1]:padded.shape[1] - 1 + shift[1]]
        inner &= neighbour == labels
    return np.where((labels > 0) & ~inner, labels, 0)


def label_colours(count: int) -> np.ndarray:
    """Distinct RGB colours for labels 1..count (tab10/tab20 cycled)."""
    matplotlib, _ = _matplotlib()
    table = matplotlib.colormaps["tab20" if count > 10 else "tab10"]
    n = table.N
    return np.asarray([table(i % n)[:3] for i in range(count)], dtype=np.float32)


def mosaic(
    layer: Layer,
    *,
    extent_mask: np.ndarray,
    voxel_size: Sequence[float],
    outlines: Sequence[Outline] = (),
    title: str = "",
    counts: tuple[int, int, int] = (8, 6, 6),
    width_in: float = 9.0,
):
    """Figure with rows of axial, coronal and sagittal slices of ``layer`` (RAS arrays).

    ``extent_mask`` chooses and crops the slices; ``outlines`` are drawn on top; a colour
    bar with ``layer.label`` is added when the label is set.
    """
    matplotlib, Figure = _matplotlib()
    box = _bounding_box(extent_mask)
    rgb = _rgb(layer, None)[box]
    extent = extent_mask[box]
    label_volumes = [o.labels[box] for o in outlines]
    vx, vy, vz = (float(v) for v in voxel_size)
    rows = []
    # (axis of the slices, number, pixel aspect = vertical voxel size / horizontal)
    for axis, count, aspect, name in ((2, counts[0], vy / vx, "axial"),
                                      (1, counts[1], vz / vx, "coronal"),
                                      (0, counts[2], vz / vy, "sagittal")):
        if count <= 0:
            continue
        tiles = []
        for index in slice_positions(extent, axis, count):
            tile = np.stack([_plane(rgb[..., c], axis, index) for c in range(3)], axis=-1)
            for outline, volume in zip(outlines, label_volumes):
                edge = _outline_2d(_plane(volume, axis, index).astype(np.int32))
                if outline.colour is not None:
                    tile[edge > 0] = outline.colour
                else:
                    present = np.unique(edge[edge > 0])
                    if present.size:
                        colours = label_colours(int(volume.max()))
                        tile[edge > 0] = colours[edge[edge > 0] - 1]
            tiles.append(tile)
        separator = np.broadcast_to(np.asarray(BACKGROUND, np.float32),
                                    (tiles[0].shape[0], 1, 3))
        row = np.concatenate([part for tile in tiles for part in (tile, separator)][:-1],
                             axis=1)
        rows.append((row, aspect, name))
    colourbar = bool(layer.label)
    image_width = width_in - (1.15 if colourbar else 0.1)
    heights = [image_width * row.shape[0] * aspect / row.shape[1] for row, aspect, _ in rows]
    top = 0.32 if title else 0.08
    height_in = sum(heights) + 0.06 * len(rows) + top + 0.08
    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(width_in, height_in), facecolor="black")
        y = height_in - top
        for (row, aspect, name), height in zip(rows, heights):
            y -= height
            axes = figure.add_axes([0.05 / width_in, y / height_in, image_width / width_in,
                                    height / height_in])
            axes.imshow(np.clip(row, 0, 1), aspect=aspect, interpolation="nearest")
            axes.set_axis_off()
            if name != "sagittal":
                axes.text(0.002, 0.5, "L", color="white", transform=axes.transAxes,
                          ha="left", va="center", fontsize=8)
            y -= 0.06
        if title:
            figure.text(0.5, 1 - 0.2 / height_in, title, color="white", ha="center",
                        va="center", fontsize=10)
        if colourbar:
            axes = figure.add_axes([(width_in - 0.98) / width_in, 0.15,
                                    0.12 / width_in, 0.7])
            norm = matplotlib.colors.Normalize(layer.vmin, layer.vmax)
            bar = figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=layer.cmap),
                                  cax=axes)
            bar.set_label(layer.label, color="white")
            bar.ax.tick_params(colors="white", labelsize=8)
            bar.outline.set_edgecolor("white")
    return figure


def thumbnails(
    layers: Sequence[tuple[str, Layer]],
    *,
    extent_mask: np.ndarray,
    voxel_size: Sequence[float],
    title: str = "",
    width_in: float = 9.0,
):
    """The central slice of the mask in each layer, side by side, titled by name: axial, or
    sagittal where the mask is elongated along z (spine, limbs)."""
    matplotlib, Figure = _matplotlib()
    box = _bounding_box(extent_mask)
    extent = extent_mask[box]
    vx, vy, vz = (float(v) for v in voxel_size)
    lengths = [n * v for n, v in zip(extent.shape, (vx, vy, vz))]
    axis = 0 if lengths[2] > 1.5 * max(lengths[0], lengths[1]) else 2
    (index,) = slice_positions(extent, axis, 1)
    aspect = vz / vy if axis == 0 else vy / vx
    tiles = []
    for name, layer in layers:
        rgb = _rgb(layer, None)[box]
        tiles.append((name, np.stack([_plane(rgb[..., c], axis, index) for c in range(3)],
                                     -1)))
    columns = min(len(tiles), 5)
    lines = -(-len(tiles) // columns)
    tile_w = width_in / columns
    tile_h = tile_w * tiles[0][1].shape[0] * aspect / tiles[0][1].shape[1]
    height_in = lines * (tile_h + 0.25) + (0.35 if title else 0.05)
    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(width_in, height_in), facecolor="black")
        for n, (name, tile) in enumerate(tiles):
            line, column = divmod(n, columns)
            y = height_in - (0.35 if title else 0.05) - (line + 1) * (tile_h + 0.25)
            axes = figure.add_axes([column * tile_w / width_in + 0.005, y / height_in,
                                    tile_w / width_in - 0.01, tile_h / height_in])
            axes.imshow(np.clip(tile, 0, 1), aspect=aspect, interpolation="nearest")
            axes.set_axis_off()
            axes.set_title(name, color="white", fontsize=8, pad=2)
        if title:
            figure.text(0.5, 1 - 0.18 / height_in, title, color="white", ha="center",
                        va="center", fontsize=10)
    return figure


# ---------------------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------------------
def lcurve(
    lambdas: Sequence[float],
    residual_norms: Sequence[float],
    regulariser_norms: Sequence[float],
    *,
    chosen: float | None,
    criterion: str,
    curvature: Sequence[float] | None = None,
    target: float | None = None,
):
    """The L-curve (log-log residual vs regulariser norm, λ annotated, chosen λ marked) and,
    for the discrepancy principle, the residual against λ with the target level."""
    matplotlib, Figure = _matplotlib()
    lambdas = np.asarray(lambdas, float)
    residual = np.asarray(residual_norms, float)
    regulariser = np.asarray(regulariser_norms, float)
    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(9.0, 3.4))
        left, right = figure.subplots(1, 2)
        left.loglog(residual, regulariser, "o-", color="#3465a4", markersize=4)
        for lam, x, y in zip(lambdas, residual, regulariser):
            left.annotate(f"{lam:.2g}", (x, y), textcoords="offset points", xytext=(4, 3),
                          fontsize=7, color="#555555")
        left.set_xlabel("data residual norm")
        left.set_ylabel("regulariser norm")
        left.set_title("L-curve")
        right.semilogx(lambdas, residual, "o-", color="#3465a4", markersize=4,
                       label="residual")
        right.set_xlabel("λ")
        right.set_ylabel("data residual norm")
        if target is not None:
            right.axhline(target, color="#cc0000", linestyle="--", label="discrepancy target")
        if curvature is not None and len(curvature) == len(lambdas):
            twin = right.twinx()
            twin.semilogx(lambdas, curvature, "s--", color="#73a833", markersize=3,
                          label="curvature")
            twin.set_ylabel("curvature", color="#4e7a1f")
        if chosen is not None:
            index = int(np.argmin(np.abs(np.log(lambdas) - np.log(chosen))))
            left.plot(residual[index], regulariser[index], "o", markersize=10,
                      markerfacecolor="none", markeredgecolor="#cc0000", markeredgewidth=2,
                      label=f"chosen λ = {chosen:.3g}")
            right.axvline(chosen, color="#cc0000", linewidth=1)
            left.legend(loc="best", fontsize=8)
        right.set_title(f"λ choice: {criterion}")
        right.legend(loc="best", fontsize=8)
        figure.tight_layout()
    return figure


def outline_volume(mask: np.ndarray) -> np.ndarray:
    """Binary mask as int labels (1 inside) for :class:`Outline`."""
    return (np.asarray(mask) > 0).astype(np.int32)


def resample_labels(labels: np.ndarray, source_affine: np.ndarray, shape: Sequence[int],
                    target_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto another voxel grid (affines in mm)."""
    if labels.shape == tuple(shape) and np.allclose(source_affine, target_affine, atol=1e-4):
        return labels
    grid = np.indices(tuple(shape), dtype=np.float64).reshape(3, -1)
    world = target_affine[:3, :3] @ grid + target_affine[:3, 3:4]
    voxels = np.linalg.solve(source_affine[:3, :3], world - source_affine[:3, 3:4])
    out = ndimage.map_coordinates(labels, voxels, order=0, mode="constant", cval=0)
    return out.reshape(tuple(shape)).astype(labels.dtype)
