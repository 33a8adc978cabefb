"""How a stored tensor holds one of our parameters, and which box of it a block needs.

Checkpoint formats store the same weights in different layouts: torch
`nn.Linear` keeps [out, in], Flax and T5X keep [in, out], attention kernels
join the heads ([d_model, heads * d_kv]) where ours split them out
([d_model, heads, d_kv]), and scanned T5X checkpoints (umT5) stack every layer
of a stack in one tensor. A `Layout` names one of these relations. Given a
block of our parameter (a tuple of slices, e.g. one device's shard) it gives
the box of the stored tensor that holds it, and turns that box into the block,
so every reader reads only what a device (or a host) needs and no reader knows
about our layout.

Kinds (ours -> stored; D = d_model, H = heads, K = d_kv):
  same        identical
  transpose   a 2-D tensor transposed (torch nn.Linear, relative-position tables)
  heads_rows  [D, H, K] stored [H*K, D]   (torch q/k/v)
  heads_cols  [H, K, D] stored [D, H*K]   (torch o)
  joined_in   [D, H, K] stored [D, H*K]   (Flax / T5X query, key, value)
  joined_out  [H, K, D] stored [H*K, D]   (Flax / T5X out)
With `layer` set, the stored tensor stacks layers along `layer_axis` and our
parameter is layer `layer` of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Box = tuple[slice, ...]

KINDS = ("same", "transpose", "heads_rows", "heads_cols", "joined_in", "joined_out")


def normalize(index, shape) -> Box:
  """`index` (a tuple of slices, possibly shorter than `shape`) as explicit
  [start, stop) slices."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _heads(index: slice, d_kv: int) -> slice:
  """The joined (heads * d_kv) range that holds the heads of `index` (whole heads)."""
  return slice(index.start * d_kv, index.stop * d_kv)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one of our parameters is stored (see the module docstring)."""

  kind: str = "same"
  layer: int | None = None
  layer_axis: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown layout kind {self.kind!r}; one of {KINDS}.")

  def at_layer(self, layer: int, layer_axis: int = 1) -> "Layout":
    """This layout inside a stored tensor that stacks layers along `layer_axis`."""
    return dataclasses.replace(self, layer=layer, layer_axis=layer_axis)

  def _inner_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    kind = self.kind
    if kind == "same":
      return tuple(ours)
    if kind == "transpose":
      return tuple(reversed(ours))
    if kind in ("heads_rows", "joined_out"):
      a, b, c = ours
      return (b * c, a) if kind == "heads_rows" else (a * b, c)
    a, b, c = ours  # heads_cols, joined_in
    return (c, a * b) if kind == "heads_cols" else (a, b * c)

  def stored_shape(self, ours: tuple[int, ...], num_layers: int | None = None) -> tuple[int, ...]:
    """The stored tensor's shape for our parameter shape `ours` (with `num_layers`
    stacked layers when this layout is a layer of a stack)."""
    shape = self._inner_shape(tuple(ours))
    if self.layer is None:
      return shape
    return shape[:self.layer_axis] + (num_layers,) + shape[self.layer_axis:]

  def box(self, ours: tuple[int, ...], index) -> Box:
    """The box of the stored tensor that holds block `index` of our parameter."""
    index = normalize(index, ours)
    kind = self.kind
    if kind == "same":
      box = index
    elif kind == "transpose":
      box = tuple(reversed(index))
    elif kind == "heads_rows":
      box = (_heads(index[1], ours[2]), index[0])
    elif kind == "heads_cols":
      box = (index[2], _heads(index[0], ours[1]))
    elif kind == "joined_in":
      box = (index[0], _heads(index[1], ours[2]))
    else:  # joined_out
      box = (_heads(index[0], ours[1]), index[2])
    if self.layer is None:
      return box
    return box[:self.layer_axis] + (slice(self.layer, self.layer + 1),) + box[self.layer_axis:]

  def block(self, data: np.ndarray, ours: tuple[int, ...], index) -> np.ndarray:
    """Block `index` of our parameter from `data`, the stored box `box(ours, index)`
    (a view where the layout allows)."""
    index = normalize(index, ours)
    if self.layer is not None:
      data = np.squeeze(data, axis=self.layer_axis)
    kind = self.kind
    if kind == "same":
      return data
    if kind == "transpose":
      return data.T
    heads = lambda i: index[i].stop - index[i].start  # heads in the block
    if kind == "heads_rows":  # [h*K, d] -> [d, h, k]
      return data.reshape(heads(1), ours[2], -1)[:, index[2], :].transpose(2, 0, 1)
    if kind == "heads_cols":  # [d, h*K] -> [h, k, d]
      return data.reshape(data.shape[0], heads(0), ours[1])[:, :, index[1]].transpose(1, 2, 0)
    if kind == "joined_in":  # [d, h*K] -> [d, h, k]
      return data.reshape(data.shape[0], heads(1), ours[2])[:, :, index[2]]
    # joined_out: [h*K, d] -> [h, k, d]
    return data.reshape(heads(0), ours[1], -1)[:, index[1], :]

  def to_stored(self, value: np.ndarray) -> np.ndarray:
    """A whole parameter of ours as the stored tensor (for writers; no layer stacks)."""
    if self.layer is not None:
      raise ValueError("to_stored writes whole tensors; stack layers yourself.")
    kind = self.kind
    if kind == "same":
      return value
    if kind == "transpose":
      return value.T
    if kind == "heads_rows":
      return value.reshape(value.shape[0], -1).T
    if kind == "heads_cols":
      return value.reshape(-1, value.shape[-1]).T
    if kind == "joined_in":
      return value.reshape(value.shape[0], -1)
    return value.reshape(-1, value.shape[-1])  # joined_out


SAME, TRANSPOSE = Layout("same"), Layout("transpose")
HEADS_ROWS, HEADS_COLS = Layout("heads_rows"), Layout("heads_cols")
JOINED_IN, JOINED_OUT = Layout("joined_in"), Layout("joined_out")


def bounding_box(boxes) -> Box:
  """The smallest box holding every box of `boxes` (all of one rank)."""
  boxes = list(boxes)
  return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))
               for a in range(len(boxes[0])))


def within(box: Box, outer: Box) -> Box:
  """`box` relative to `outer`, which holds it (to slice a read of `outer`)."""
  return tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))


def box_size(box: Box) -> int:
  return int(np.prod([s.stop - s.start for s in box], dtype=np.int64))
