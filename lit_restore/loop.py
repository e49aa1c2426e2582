"""AutoDIR's automatic loop, as a pure function of its parts: each pass
1. BIQA scores the image against the class prompts still in play (softmax over their logits);
2. if "no" artifact wins, stop;
3. the LDM samples with the probability-weighted mixture of the prompts' token embeddings as
   text context;
4. the SCM corrects the LDM output from [input, LDM output], except after a low-resolution pass,
   where the LDM output itself goes on (the SCM would pull the blurry input's structure back;
   AutoDIR's evaluation). `scm_every_pass` keeps the SCM there too: the tiny SCM, trained on
   samples of every type, gains after such passes (docs/benchmarks.md, "The automatic loop");
5. the detected class leaves the prompt set, so each degradation is handled at most once;
up to `max_passes` passes. The networks come in as callables (`lit_restore.restorers` gives them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


# A pass that restored this class feeds its LDM output on without the SCM.
SKIP_SCM_AFTER = "lowres"


@dataclass
class PassLog:
    """What one pass of the automatic loop saw and did."""

    index: int
    probabilities: dict[str, float]  # over the classes still in play
    detected: str
    scm: bool = False  # whether the SCM corrected this pass's output


@dataclass
class LoopResult:
    image: Tensor
    passes: list[PassLog] = field(default_factory=list)
    stopped: str = ""  # "no artifact" or "max passes"


def automatic_loop(
    image: Tensor,
    classify: Callable[[Tensor], Tensor],
    classes: Sequence[str],
    step: Callable[[Tensor, Tensor], Tensor],
    correct: Optional[Callable[[Tensor, Tensor], Tensor]],
    max_passes: int = 7,
    scm_every_pass: bool = False,
) -> LoopResult:
    """Run the loop on one image (1, 3, H, W) in [0, 1].

    `classify(image)` gives (1, K) logits over `classes` (which must hold "no");
    `step(image, weights)` restores with the (K,) prompt mixture weights (zero for classes out of
    play) and returns the LDM output; `correct(image, ldm_out)` is the SCM (None: no SCM), skipped
    after a `SKIP_SCM_AFTER` pass unless `scm_every_pass`.
    """
    classes = list(classes)
    if "no" not in classes:
        raise ValueError(f"the BIQA classes must include 'no'; got {', '.join(classes)}")
    in_play = torch.ones(len(classes), dtype=torch.bool)
    result = LoopResult(image=image)
    for index in range(max_passes):
        logits = classify(result.image).reshape(-1).float().cpu()
        probs = logits.masked_fill(~in_play, float("-inf")).softmax(dim=0)
        detected = classes[int(probs.argmax())]
        log = PassLog(index, {c: float(p) for c, p, keep in zip(classes, probs, in_play) if keep}, detected)
        result.passes.append(log)
        if detected == "no":
            result.stopped = "no artifact"
            return result
        ldm_out = step(result.image, probs)
        if correct is not None and (scm_every_pass or detected != SKIP_SCM_AFTER):
            result.image = correct(result.image, ldm_out)
            log.scm = True
        else:
            result.image = ldm_out
        in_play[classes.index(detected)] = False
    result.stopped = "max passes"
    return result


def mix_prompts(weights: Tensor, prompt_states: Tensor) -> Tensor:
    """Σ_k w_k E_T(T_k): (K,) weights × (K, L, D) token states → (1, L, D) context."""
    return torch.einsum("k,kld->ld", weights.to(prompt_states), prompt_states)[None]
