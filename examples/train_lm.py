"""Train a small decoder-only transformer (flax.nnx + optax) on a generated corpus, with fa3_jax attention.

  python examples/train_lm.py                      # fa3_jax attention (Hopper kernels on GPU, reference on CPU)
  python examples/train_lm.py --attention jax      # jax.nn.dot_product_attention instead
  python examples/train_lm.py --compare            # both, same init and data; checks the loss curves agree
  python examples/train_lm.py --packed             # variable-length documents packed into rows (segment ids)

--compare prints PASS or FAIL against a stated tolerance (exit status 1 on FAIL) and, when matplotlib is installed,
writes a PNG of the loss curves (--plot). The corpus is generated (no downloads): sentences from a tiny grammar,
tokenised by character.

--packed cuts the corpus into documents of random lengths and packs them, whole, into the fixed-length rows of each
batch: segment ids say which document a token belongs to (-1 for the padding at a row's end), positions restart at
0 with every document (rotary), and the loss skips targets across document boundaries. fa3 attention takes the
segment ids (documents never see each other, on the kernels); jax.nn gets the equivalent dense mask.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fa3_jax.flax.nnx as fa3_nnx


def make_corpus(n_chars: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  subjects = ["the cat", "a dog", "my friend", "the robot", "an owl", "the kernel", "a tensor"]
  verbs = ["sees", "likes", "computes", "follows", "eats", "writes", "sorts"]
  objects = ["the moon", "a fish", "the gradient", "seven apples", "the softmax", "a long song"]
  parts = []
  while sum(map(len, parts)) < n_chars:
    parts.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}. ")
  return "".join(parts)[:n_chars]


class Block(nnx.Module):
  def __init__(self, dim, heads, kv_heads, attention, dtype, rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = attention
    self.attn = fa3_nnx.MultiHeadAttention(heads, dim, num_kv_heads=kv_heads, causal=True, rope_theta=10000.0,
                                           dtype=dtype, use_bias=False, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.mlp2 = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, packing=None):
    """x (batch, seq, dim); packing: None, or (segment_ids, positions, max_segments) of packed documents."""
    h = self.ln1(x)
    segment_ids, positions, max_segments = packing or (None, jnp.arange(x.shape[1]), None)
    if self.attention == "fa3":
      a = self.attn(h, positions=positions, segment_ids=segment_ids, max_segments=max_segments)
    else:  # the same projections and rotary, with jax.nn's attention in the middle
      m = self.attn
      q, k, v = (f(h).astype(h.dtype if m.dtype is None else m.dtype) for f in (m.query, m.key, m.value))
      q, k = fa3_nnx.apply_rotary(q, positions), fa3_nnx.apply_rotary(k, positions)
      if segment_ids is None:
        a = m.out(jax.nn.dot_product_attention(q, k, v, is_causal=True))
      else:  # causal within each document
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids >= 0)[:, :, None]
        a = m.out(jax.nn.dot_product_attention(q, k, v, mask=same[:, None], is_causal=True))
    x = x + a.astype(x.dtype)
    return x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x)))).astype(x.dtype)


class LM(nnx.Module):
  def __init__(self, vocab, dim, depth, heads, kv_heads, attention, dtype, rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, kv_heads, attention, dtype, rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens, packing=None):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, packing)
    return self.embed.attend(self.ln(x)).astype(jnp.float32)


MIN_DOCUMENT = 8  # --packed: the shortest document, which bounds the documents per row (max_segments)


def make_documents(data: np.ndarray, max_length: int, seed: int) -> list[np.ndarray]:
  """The corpus cut into consecutive documents of random lengths in [MIN_DOCUMENT, max_length]."""
  rng = np.random.default_rng(seed)
  cuts = np.cumsum(rng.integers(MIN_DOCUMENT, max_length + 1, len(data) // MIN_DOCUMENT))
  return np.split(data, cuts[cuts < len(data)])[:-1]


def pack(documents: list[np.ndarray], first: int, batch: int, length: int):
  """Rows of `length` tokens filled with whole documents from documents[first] on (cyclically), a row closed when
  the next document does not fit. Returns tokens, segment_ids (a document's index within its row; -1 for the
  padding) and positions (from 0 in every document), each (batch, length) int32, and the next document's index."""
  tokens, positions = np.zeros((2, batch, length), np.int32)
  segment_ids = np.full((batch, length), -1, np.int32)
  i = first
  for row in range(batch):
    used = 0
    for segment in range(length):
      doc = documents[i % len(documents)]
      if used + len(doc) > length:
        break
      rows = slice(used, used + len(doc))
      tokens[row, rows], segment_ids[row, rows], positions[row, rows] = doc, segment, np.arange(len(doc))
      used, i = used + len(doc), i + 1
  return tokens, segment_ids, positions, i


def train(args, attention: str, label: str | None = None) -> list[float]:
  """Trains with `attention` ("fa3" or "jax") and returns the loss of every step; `label` names the run in the
  progress line (default: attention)."""
  text = make_corpus(200_000)
  vocab = sorted(set(text))
  data = np.array([vocab.index(c) for c in text], np.int32)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
  model = LM(len(vocab), args.dim, args.depth, args.heads, args.kv_heads, attention, dtype, nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.Param)

  # Packed rows hold documents of at least MIN_DOCUMENT tokens: a static bound, so one compilation serves all.
  max_segments = (args.seq + 1) // MIN_DOCUMENT

  @nnx.jit
  def step(model, optimizer, batch, segments):
    """batch (b, seq + 1) tokens; segments None, or (segment_ids, positions) of the same shape (--packed)."""
    def loss_fn(model):
      packing = None if segments is None else (segments[0][:, :-1], segments[1][:, :-1], max_segments)
      losses = optax.softmax_cross_entropy_with_integer_labels(model(batch[:, :-1], packing), batch[:, 1:])
      if segments is None:
        return losses.mean()
      ids = segments[0]
      within = (ids[:, 1:] == ids[:, :-1]) & (ids[:, :-1] >= 0)  # no target across documents or in padding
      return jnp.sum(losses * within) / jnp.maximum(within.sum(), 1)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(args.seed)
  documents = make_documents(data, args.seq + 1, args.seed) if args.packed else None
  losses, tokens, start, next_document = [], 0, None, 0
  for i in range(args.steps):
    if args.packed:
      batch, *segments, next_document = pack(documents, next_document, args.batch, args.seq + 1)
      if i == 0:
        counts = [len(np.unique(row[row >= 0])) for row in segments[0]]
        print(f"packed: {sum(counts)} documents in {args.batch} rows of {args.seq + 1} tokens "
              f"({np.mean(segments[0] < 0):.0%} padding), at most {max_segments} documents per row")
      batch, segments = jnp.asarray(batch), tuple(map(jnp.asarray, segments))
    else:
      idx = rng.integers(0, len(data) - args.seq - 1, args.batch)
      batch, segments = jnp.asarray(np.stack([data[j:j + args.seq + 1] for j in idx])), None
    loss = float(step(model, optimizer, batch, segments))
    losses.append(loss)
    if i == 0:
      start = time.perf_counter()  # exclude compilation
    else:
      tokens += args.batch * args.seq
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    done = int(30 * (i + 1) / args.steps)
    sys.stdout.write(f"\r[{label or attention}] [{'#' * done}{'.' * (30 - done)}] step {i + 1}/{args.steps} "
                     f"loss {loss:.4f} {rate:,.0f} tok/s")
    sys.stdout.flush()
  print()
  return losses


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--attention", choices=["fa3", "jax"], default="fa3")
  p.add_argument("--compare", action="store_true", help="train with both and compare the loss curves")
  p.add_argument("--packed", action="store_true",
                 help="pack variable-length documents into the rows, with segment ids and per-document positions")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--dtype", choices=["float32", "bfloat16"],
                 default="bfloat16" if jax.default_backend() == "gpu" else "float32")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tolerance", type=float, default=0.02,
                 help="--compare: allowed mean |loss difference| beyond the bfloat16 noise floor")
  p.add_argument("--plot", default="train_lm_loss.png",
                 help="--compare: where to write the PNG of the loss curves (needs matplotlib); '' for none")
  args = p.parse_args(argv)
  print(f"backend {jax.default_backend()}, dtype {args.dtype}")
  if not args.compare:
    train(args, args.attention)
    return 0
  return 0 if compare(args) else 1


def compare(args) -> bool:
  """Trains with our attention and with jax.nn's from the same init on the same batches. In float32 the two loss
  curves must agree to --tolerance. In bfloat16 two correct implementations drift apart through rounding alone, so
  both are measured against a float32 run (jax.nn) instead: ours may be at most twice as far from it as jax.nn's
  bfloat16 run, plus --tolerance (FlashAttention-3's tolerance rule, applied to loss curves)."""
  curves = {"fa3": train(args, "fa3"), "jax": train(args, "jax")}
  if args.dtype != "float32":
    curves["jax float32"] = train(argparse.Namespace(**{**vars(args), "dtype": "float32"}), "jax", "jax float32")
  curves = {name: np.array(c) for name, c in curves.items()}
  for name, c in curves.items():
    print(f"{name:>12}: loss {c[0]:.4f} -> {c[-1]:.4f} (mean of the last 10 steps {c[-10:].mean():.4f})")
  if args.plot:
    plot(curves, args.plot, f"{args.dtype}, {args.steps} steps")
  gap = lambda a, b: float(np.abs(curves[a] - curves[b]).mean())
  if args.dtype == "float32":
    measured, allowed = gap("fa3", "jax"), args.tolerance
    what = f"mean |fa3 - jax.nn| over the curve {measured:.2e}"
    rule = f"--tolerance {allowed:.2e}"
  else:
    measured, theirs = gap("fa3", "jax float32"), gap("jax", "jax float32")
    allowed = 2 * theirs + args.tolerance
    what = f"fa3's mean distance from the float32 jax.nn curve {measured:.2e}"
    rule = f"{allowed:.2e} = 2 x jax.nn bfloat16's distance {theirs:.2e} + --tolerance {args.tolerance:.2e}"
  passed = measured <= allowed
  print(f"{'PASS' if passed else 'FAIL'}: {what} {'<=' if passed else '>'} {rule}")
  return passed


def plot(curves: dict, path: str, title: str) -> None:
  """Writes the loss curves ({name: losses}) to a PNG at path, if matplotlib is installed."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib is not installed: no plot of the loss curves (pip install matplotlib)")
    return
  matplotlib.use("Agg")  # files only: no display needed
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for (name, c), style in zip(curves.items(), ("-", "--", ":")):  # the curves nearly coincide: tell them apart
    ax.plot(np.arange(1, len(c) + 1), c, style, label=name, linewidth=1.5)
  ax.set(xlabel="step", ylabel="training loss", title=f"train_lm.py --compare ({title})")
  ax.legend()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  print(f"loss curves written to {os.path.abspath(path)}")


if __name__ == "__main__":
  sys.exit(main())
