"""``make demo``: train a small 3D CNN on synthetic volumes, end to end.

The demo generates volumes in-process (no downloads): each holds one of three
shapes -- a solid **sphere**, a solid **cube** or a **torus** -- with random size,
position, orientation (torus) and brightness, on a random background level, plus
Gaussian noise. A four-layer 3D CNN, written and trained exactly as in MegEngine::

    gm = GradManager().attach(model.parameters())
    opt = optim.Adam(model.parameters(), lr=...)
    with gm:
        loss = F.nn.cross_entropy(model(x), label)
        gm.backward(loss)
    opt.step().clear_grad()

(He-initialised, inputs standardised per volume, Adam with a cosine learning-rate
decay) learns to tell them apart. Every epoch prints the mean loss, the training and
held-out accuracy, the epoch time and the convolution throughput in GFLOP/s
(analytic FLOPs of the convolutions, forward ``2*N*O*Do*Ho*Wo*(C/g)*kd*kh*kw`` and
backward twice that, divided by the training time). Afterwards the demo saves a
MegEngine-compatible checkpoint, reloads it into a fresh network and checks that
the outputs are identical, and draws slices of one volume per class and of the
first layer's feature maps into a PNG.

Run it with ``make demo``, ``volconv demo`` or ``python -m volconv.demo``; it exits
with status 1 if the held-out accuracy is below 90% (except with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

import volconv
import volconv.functional as F
import volconv.module as M
import volconv.optimizer as optim
from volconv.autodiff import GradManager

__all__ = [
    "CLASSES",
    "ShapeNet",
    "conv_flops",
    "evaluate",
    "main",
    "make_volumes",
]

CLASSES = ("sphere", "cube", "torus")
TARGET_ACCURACY = 0.9
CHECKPOINT_NAME = "shapenet.mge"
FIGURE_NAME = "shapenet_slices.png"
METRICS_NAME = "metrics.json"


# ---- data -----------------------------------------------------------------------------------
def make_volumes(
    n_per_class: int, size: int = 16, noise: float = 0.25, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic single-channel volumes of spheres, cubes and tori.

    Each volume is ``background + brightness * occupancy + noise * N(0, 1)``,
    standardised to zero mean and unit variance, where
    the occupancy is an anti-aliased (soft-edged) solid: a sphere of radius ``r``, an
    axis-aligned cube of half-side ``0.8 r``, or a torus (ring radius ``0.62 r``, tube
    radius ``0.34 r``) lying in a random coordinate plane. ``r``, the centre (kept
    inside the volume), the brightness and the background are drawn per sample.

    Parameters
    ----------
    n_per_class : int
        Volumes per class; the result holds ``3 * n_per_class`` of them, shuffled.
    size : int
        Edge length of the cubic volume (>= 8).
    noise : float
        Standard deviation of the additive Gaussian noise.
    rng : numpy.random.Generator, optional
        Source of randomness (a fresh default generator if omitted).

    Returns
    -------
    x : ndarray, float32, shape ``(3 * n_per_class, 1, size, size, size)``
    y : ndarray, int32, shape ``(3 * n_per_class,)``
        Class indices into :data:`CLASSES`.

    Examples
    --------
    >>> import numpy as np
    >>> x, y = make_volumes(2, size=12, rng=np.random.default_rng(0))
    >>> x.shape, x.dtype, sorted(y.tolist())
    ((6, 1, 12, 12, 12), dtype('float32'), [0, 0, 1, 1, 2, 2])
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    rng = np.random.default_rng() if rng is None else rng
    n = 3 * n_per_class
    labels = np.repeat(np.arange(3, dtype=np.int32), n_per_class)
    radius = rng.uniform(0.24, 0.36, n) * size
    margin = radius + 1.0
    centre = rng.uniform(margin[:, None], size - 1 - margin[:, None], (n, 3))
    axis = rng.integers(0, 3, n)  # the torus's symmetry axis
    brightness = rng.uniform(0.7, 1.3, n)
    background = rng.uniform(-0.3, 0.3, n)

    coords = np.arange(size, dtype=np.float64)
    x = np.empty((n, 1, size, size, size), dtype=np.float32)
    for i in range(n):
        d, h, w = (coords - c for c in centre[i])
        d, h, w = d[:, None, None], h[None, :, None], w[None, None, :]
        r = radius[i]
        if labels[i] == 0:  # sphere: signed distance to the surface
            sd = np.sqrt(d * d + h * h + w * w) - r
        elif labels[i] == 1:  # cube (Chebyshev ball)
            sd = np.maximum(np.maximum(np.abs(d), np.abs(h)), np.abs(w)) - 0.8 * r
        else:  # torus around one of the three axes
            comps = [d, h, w]
            along = comps.pop(int(axis[i]))
            a, b = comps
            ring = np.sqrt(a * a + b * b) - 0.62 * r
            sd = np.sqrt(ring * ring + along * along) - 0.34 * r
        occupancy = np.clip(0.5 - sd, 0.0, 1.0)
        x[i, 0] = background[i] + brightness[i] * occupancy
    x += (noise * rng.standard_normal(x.shape)).astype(np.float32)
    # standardise each volume (zero mean, unit variance), as one would real scans
    x -= x.mean(axis=(1, 2, 3, 4), keepdims=True)
    x /= x.std(axis=(1, 2, 3, 4), keepdims=True) + np.float32(1e-6)
    order = rng.permutation(n)
    return x[order], labels[order]


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Index arrays covering ``range(n)`` in batches (shuffled when ``rng`` is given)."""
    order = np.arange(n) if rng is None else rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


# ---- model ----------------------------------------------------------------------------------
class ShapeNet(M.Module):
    """A small 3D CNN: three 3x3x3 convolutions, global average pooling, one linear layer.

    ``(N, 1, S, S, S)`` -> conv(1->c) -> ReLU -> conv(c->2c, stride 2) -> ReLU ->
    conv(2c->4c, stride 2) -> ReLU -> mean over (D, H, W) -> Linear(4c -> classes).

    Parameters
    ----------
    width : int
        Channels of the first layer ``c``.
    num_classes : int

    Examples
    --------
    >>> import numpy as np, volconv as mge
    >>> net = ShapeNet(width=4)
    >>> net(mge.tensor(np.zeros((2, 1, 8, 8, 8), dtype=np.float32))).shape
    (2, 3)
    """

    def __init__(self, width: int = 8, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        c = width
        self.features = M.Sequential(
            M.Conv3d(1, c, 3, padding=1),
            M.ReLU(),
            M.Conv3d(c, 2 * c, 3, stride=2, padding=1),
            M.ReLU(),
            M.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1),
            M.ReLU(),
        )
        self.fc = M.Linear(4 * c, num_classes)
        for conv in self.convolutions():  # He initialisation suits the ReLUs
            M.init.msra_normal_(conv.weight, nonlinearity="relu")

    def forward(self, x):
        x = self.features(x)
        x = F.mean(x, axis=(2, 3, 4))
        return self.fc(x)

    def first_layer(self, x):
        """The first convolution's feature maps after its ReLU, ``(N, c, S, S, S)``."""
        return F.relu(self.features[0](x))

    def convolutions(self) -> list:
        """The Conv3d layers in the order they run."""
        return [self.features[i] for i in range(len(self.features))
                if isinstance(self.features[i], M.Conv3d)]  # fmt: skip


def conv_flops(convs: Iterable, spatial: Sequence[int]) -> int:
    """Forward FLOPs per sample of a chain of Conv3d layers (multiply and add count 2).

    A convolution costs ``2 * O * Do * Ho * Wo * (C / groups) * kd * kh * kw`` per
    sample; its backward pass (input and weight gradients) costs twice that.

    Parameters
    ----------
    convs : iterable of Conv3d
        Layers in order; each layer's output size feeds the next.
    spatial : sequence of 3 ints
        ``(D, H, W)`` of the first layer's input.

    Examples
    --------
    >>> import volconv.module as M
    >>> conv_flops([M.Conv3d(1, 8, 3, padding=1)], (16, 16, 16))  # 2*8*16**3*27
    1769472
    """
    total = 0
    size = [int(s) for s in spatial]
    for conv in convs:
        k, s, p, d = (_triple(getattr(conv, a)) for a in
                      ("kernel_size", "stride", "padding", "dilation"))  # fmt: skip
        size = [(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
        per_output = conv.in_channels // conv.groups * k[0] * k[1] * k[2]
        total += 2 * conv.out_channels * size[0] * size[1] * size[2] * per_output
    return total


def _triple(v) -> tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 3
    return tuple(int(e) for e in v)  # type: ignore[return-value]


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)`` (no gradients)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    for idx in batches(len(x), batch_size, None):
        logits = model(volconv.tensor(x[idx]))
        label = volconv.tensor(y[idx])
        loss_sum += float(F.nn.cross_entropy(logits, label).numpy()) * len(idx)
        correct += int((logits.numpy().argmax(axis=1) == y[idx]).sum())
    return loss_sum / len(x), correct / len(x)


# ---- progress output ------------------------------------------------------------------------
class _TextBar:
    """A minimal progress bar for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, stream=sys.stderr) -> None:
        self.total, self.desc, self.n, self.stream = total, desc, 0, stream
        self.live = stream is not None and hasattr(stream, "isatty") and stream.isatty()
        self.postfix = ""

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.live:
            self._draw()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def _draw(self) -> None:
        width = 30
        filled = int(width * self.n / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {self.postfix}")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _TextBar(total, desc, stream=None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc)
    # disable=None: tqdm draws only on a terminal (no log spam when piped)
    return tqdm(total=total, desc=desc, leave=False, unit="batch", disable=None, mininterval=0.25)


# ---- the figure -----------------------------------------------------------------------------
def save_figure(model, x: np.ndarray, y: np.ndarray, pred: np.ndarray, path: str) -> bool:
    """Draw a slice of one volume per class and the same slice of its first-layer feature maps.

    The slice (along D) is the one where the volume departs most from its median, i.e.
    through the shape. Rendering uses matplotlib's Agg canvas without pyplot, so no GUI
    backend is touched. Returns False (and draws nothing) if matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    picks = [int(np.flatnonzero(y == c)[0]) for c in range(len(CLASSES)) if (y == c).any()]
    vols = x[picks]
    maps = model.first_layer(volconv.tensor(vols)).numpy()
    n_maps = maps.shape[1]
    fig = Figure(figsize=(1.6 * (1 + n_maps), 2.1 * len(picks)))
    axes = fig.subplots(len(picks), 1 + n_maps, squeeze=False)
    for row, i in enumerate(picks):
        vol = vols[row, 0]
        k = int(np.abs(vol - np.median(vol)).sum(axis=(1, 2)).argmax())
        ax = axes[row, 0]
        ax.imshow(vol[k], cmap="gray")
        ax.set_title(f"{CLASSES[y[i]]} (pred {CLASSES[pred[i]]})\ninput, slice d={k}", fontsize=7)
        for j in range(n_maps):
            ax = axes[row, 1 + j]
            ax.imshow(maps[row, j, k], cmap="magma")
            ax.set_title(f"conv1 map {j}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("volconv demo: input slices and first-layer feature maps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---- main -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="volconv demo",
        description="Train a small 3D CNN on synthetic spheres, cubes and tori with volconv.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=None, help="volume edge length (default: 16)")
    p.add_argument(
        "--train-per-class", type=int, default=None, help="training volumes per class (600)"
    )
    p.add_argument(
        "--test-per-class", type=int, default=None, help="held-out volumes per class (100)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    p.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="initial Adam learning rate, decayed to a tenth on a cosine (default: 3e-3)",
    )
    p.add_argument("--width", type=int, default=8, help="channels of the first layer")
    p.add_argument("--quick", action="store_true", help="a tiny run (for tests); no accuracy bar")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit status (0 on success).

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (``sys.argv[1:]`` if omitted); see ``--help``.

    Returns
    -------
    int
        0 if the held-out accuracy reaches 90% (any accuracy with ``--quick``) and the
        reloaded checkpoint reproduces the outputs; 1 otherwise.
    """
    args = _parser().parse_args(None if argv is None else [str(a) for a in argv])
    quick = args.quick
    epochs = args.epochs if args.epochs is not None else (1 if quick else 5)
    size = args.size if args.size is not None else (12 if quick else 16)
    n_train = args.train_per_class if args.train_per_class is not None else (8 if quick else 600)
    n_test = args.test_per_class if args.test_per_class is not None else (4 if quick else 100)
    out = str(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    rng = np.random.default_rng(args.seed)
    x_train, y_train = make_volumes(n_train, size, rng=rng)
    x_test, y_test = make_volumes(n_test, size, rng=rng)
    print(
        f"volconv demo: {len(x_train)} training / {len(x_test)} held-out volumes of "
        f"{size}^3 ({', '.join(CLASSES)}), seed {args.seed}, "
        f"data in {time.perf_counter() - t_start:.1f}s"
    )

    volconv.random.seed(args.seed)
    model = ShapeNet(width=args.width)
    gm = GradManager().attach(model.parameters())
    opt = optim.Adam(model.parameters(), lr=args.lr)
    fwd_flops = conv_flops(model.convolutions(), (size, size, size))
    n_params = sum(int(p.size) for p in model.parameters())
    print(
        f"model: ShapeNet(width={args.width}), {n_params} parameters, "
        f"{fwd_flops / 1e6:.2f} MFLOP per volume (forward convolutions); "
        f"Adam, lr {args.lr:g} decaying to {args.lr / 10:g}, batch {args.batch_size}"
    )

    steps_per_epoch = -(-len(x_train) // args.batch_size)
    total_steps, step = epochs * steps_per_epoch, 0
    history = []
    for epoch in range(1, epochs + 1):
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{epochs}", not args.no_progress)
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss_sum, correct = 0.0, 0
        for idx in batches(len(x_train), args.batch_size, rng):
            for group in opt.param_groups:  # cosine decay from lr to lr / 10
                group["lr"] = args.lr * (0.55 + 0.45 * math.cos(math.pi * step / total_steps))
            step += 1
            data, label = volconv.tensor(x_train[idx]), volconv.tensor(y_train[idx])
            with gm:
                logits = model(data)
                loss = F.nn.cross_entropy(logits, label)
                gm.backward(loss)
            opt.step().clear_grad()
            loss_sum += float(loss.numpy()) * len(idx)
            correct += int((logits.numpy().argmax(axis=1) == y_train[idx]).sum())
            bar.update(1)
            bar.set_postfix_str(f"loss {float(loss.numpy()):.3f}", refresh=False)
        bar.close()
        train_time = time.perf_counter() - t0
        cpu_time = time.process_time() - cpu0
        test_loss, test_acc = evaluate(model, x_test, y_test)
        gflops = 3 * fwd_flops * len(x_train) / train_time / 1e9
        record = {
            "epoch": epoch,
            "loss": loss_sum / len(x_train),
            "train_acc": correct / len(x_train),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_time_s": train_time,
            "epoch_cpu_s": cpu_time,
            "gflops": gflops,
        }
        history.append(record)
        print(
            f"epoch {epoch:2d}/{epochs}  loss {record['loss']:.4f}  "
            f"train acc {record['train_acc']:.3f}  held-out acc {test_acc:.3f}  "
            f"time {train_time:5.1f}s (cpu {cpu_time:5.1f}s)  conv {gflops:5.2f} GFLOP/s "
            f"({len(x_train) / train_time:.0f} volumes/s)"
        )
    train_total = time.perf_counter() - t_start

    # ---- checkpoint round trip: save, reload into a fresh network, compare outputs --------
    ckpt = os.path.join(out, CHECKPOINT_NAME)
    volconv.save(model.state_dict(), ckpt)
    fresh = ShapeNet(width=args.width)
    fresh.load_state_dict(volconv.load(ckpt))
    probe = volconv.tensor(x_test[: min(len(x_test), 16)])
    reference = model(probe).numpy()
    reloaded = fresh(probe).numpy()
    identical = bool(np.array_equal(reference, reloaded))
    print(
        f"checkpoint: {ckpt} ({os.path.getsize(ckpt)} bytes, {len(model.state_dict())} tensors); "
        f"reloaded outputs {'identical' if identical else 'DIFFER'}"
    )

    # ---- figure ---------------------------------------------------------------------------
    pred = np.concatenate(
        [model(volconv.tensor(x_test[i])).numpy().argmax(1) for i in batches(len(x_test), 64, None)]
    ) if len(x_test) else np.zeros(0, dtype=np.int64)  # fmt: skip
    fig_path = os.path.join(out, FIGURE_NAME)
    if save_figure(model, x_test, y_test, pred, fig_path):
        print(f"figure: {fig_path}")
    else:
        fig_path = None
        print("figure: skipped (matplotlib is not installed; pip install matplotlib)")

    final = history[-1] if history else {"test_acc": float("nan"), "loss": float("nan")}
    elapsed = time.perf_counter() - t_start
    with open(os.path.join(out, METRICS_NAME), "w") as f:
        json.dump(
            {
                "history": history,
                "test_acc": final["test_acc"],
                "total_time_s": elapsed,
                "train_time_s": train_total,
                "checkpoint": ckpt,
                "figure": fig_path,
                "reload_identical": identical,
                "seed": args.seed,
                "quick": quick,
            },
            f,
            indent=2,
        )
    passed = identical and (quick or final["test_acc"] >= TARGET_ACCURACY)
    print(
        f"summary: held-out accuracy {final['test_acc']:.3f} on {len(x_test)} volumes after "
        f"{epochs} epoch{'' if epochs == 1 else 's'}, {elapsed:.1f}s in total"
        + ("" if quick else f" (target >= {TARGET_ACCURACY:.2f}: {'PASS' if passed else 'FAIL'})")
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
