"""Peak memory of `restore` per image pixel, for the fast path and the automatic loop.

For each size, a PNG of that size is restored in a fresh subprocess through the command's own
per-image path (`restore_file`: read, float tensor, tiled restoration, 8-bit copy, PNG write),
with stand-in networks (two 3×3 convolutions) so the figure is the per-pixel cost of the
pipeline and not a model's per-tile working set, which depends on `--tile` alone:

* fast: one tiled network pass (the `--fast` restorer's path);
* auto: the automatic loop with two restoring passes, each an LDM stand-in and a tiled SCM
  stand-in that takes the pass input and the LDM output, then "no artifact".

It prints the peak RSS growth over the process's baseline and that divided by the pixel count.

    python bench/restore_memory.py [--sizes 2000 4000] [--tile 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def write_input(path: Path, size: int) -> None:
    """A size × size RGB gradient PNG (written here, so the measuring process never held it)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size).astype(np.uint8)
    rgb = np.stack([np.broadcast_to(ramp[None, :], (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
                    np.full((size, size), 99, np.uint8)], -1)
    Image.fromarray(rgb).save(path, compress_level=1)


def child(size: int, mode: str, tile: int, folder: Path) -> None:
    import torch
    from torch import nn

    from lit_restore.loop import automatic_loop
    from lit_restore.restore import restore_file
    from lit_restore.tiling import restore_tiled

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    scm = nn.Conv2d(6, 3, 3, padding=1).eval()
    path = folder / f"in{size}.png"

    class Stand:
        @torch.no_grad()
        def restore(self, image, generator):
            def ldm(x):
                return restore_tiled(net, x, tile, 64)

            def correct(x, y):
                return restore_tiled(lambda a, b: scm(torch.cat([a, b], 1)), (x, y), tile, 64)

            if mode == "fast":
                return ldm(image).clamp_(0, 1), {"mode": mode}
            logits = iter([torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[3.0, 0.0, 0.0]])])
            result = automatic_loop(image, lambda x: next(logits), ["no", "noise", "blur"], lambda x, w: ldm(x), correct)
            return result.image, {"mode": mode, "passes": len(result.passes)}

    out = folder / f"out-{mode}-{size}"
    out.mkdir(exist_ok=True)
    base = peak_rss_bytes()
    with torch.no_grad():
        restore_file(Stand(), path, out, set(), 0, torch.device("cpu"))
    grown = peak_rss_bytes() - base
    print(json.dumps({"size": size, "mode": mode, "pixels": size * size, "peak_growth_bytes": grown,
                      "bytes_per_pixel": grown / (size * size)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        size, mode, folder = a.child
        child(int(size), mode, a.tile, Path(folder))
        return
    with tempfile.TemporaryDirectory() as folder:
        print(f"{'mode':6} {'size':>6} {'peak growth':>12} {'bytes/pixel':>12}")
        for size in a.sizes:
            write_input(Path(folder) / f"in{size}.png", size)
            for mode in ("fast", "auto"):
                run = subprocess.run([sys.executable, __file__, "--tile", str(a.tile), "--child", str(size), mode, folder],
                                     capture_output=True, text=True, check=True)
                r = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"{mode:6} {size:>5}² {r['peak_growth_bytes'] / 2**20:>9.0f} MiB {r['bytes_per_pixel']:>12.1f}")


if __name__ == "__main__":
    main()
