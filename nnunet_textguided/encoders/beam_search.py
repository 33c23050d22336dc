"""Group beam search for CoCa captions, independent of the transformers release.

Why here: open_clip's ``CoCa.generate(generation_type="beam_search")`` (the default decoding of open_clip's
CoCa, and so of BiCLIP's caption stream: seed 000 names CoCa-CLIP but no decoding, so open_clip's default is
kept) drives transformers' ``BeamSearchScorer``, which transformers 5 removed. ``group_beam_search`` is the same
search: ``num_beams`` beams in ``num_groups`` groups, each group ranking ``2 x group size`` candidates by the
running sum of raw next-token logits (open_clip adds logits, not log-probabilities); a candidate ending in the end
token becomes a finished hypothesis (score / length, length penalty 1) if it ranks within the group size; a
group is done once it holds ``group size`` hypotheses and none of its running beams can beat the worst of them;
the end token is forbidden before ``min_seq_len`` tokens; the search stops at ``seq_len`` tokens or when every
group is done, and each image's best hypothesis over all groups is returned, end token appended. The test
compares it token for token with open_clip's generate under transformers 4.x.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["group_beam_search"]


class _Finished:
    """The best ``size`` finished hypotheses of one group of one image."""

    def __init__(self, size: int):
        self.size, self.beams, self.worst = size, [], 1e9

    def add(self, ids: torch.Tensor, score_sum: float, length: int) -> None:
        score = score_sum / length
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, ids))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def cannot_improve(self, best_running_sum: float, length: int) -> bool:
        return len(self.beams) >= self.size and self.worst >= best_running_sum / length


@torch.no_grad()
def group_beam_search(next_logits: Callable[[torch.Tensor], torch.Tensor], batch: int, sot: int, eot: int, pad: int,
                      seq_len: int, min_seq_len: int, num_beams: int, num_groups: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids (batch, <= seq_len), each row starting with ``sot``.

    ``next_logits(ids)``: ids (batch * num_beams, t), the beams of image i in rows i * num_beams ... -> the
    vocabulary logits of the next token (batch * num_beams, V).
    """
    if num_beams < 2 or num_beams % num_groups:
        raise ValueError(f"beam search needs num_beams >= 2 divisible by num_groups (got {num_beams}, {num_groups})")
    size = num_beams // num_groups
    ids = torch.full((batch * num_beams, 1), sot, dtype=torch.long, device=device)
    # only the first beam of each group starts live: the others would repeat its tokens
    sums = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=device)
    sums[:, ::size] = 0
    sums = sums.view(-1)
    finished = [[_Finished(size) for _ in range(num_groups)] for _ in range(batch)]
    done = [[False] * num_groups for _ in range(batch)]
    while True:
        logits = next_logits(ids).float()
        if ids.shape[1] < min_seq_len:
            logits[:, eot] = float("-inf")
        vocab = logits.shape[-1]
        new_tokens = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
        length = ids.shape[1] + 1
        for group in range(num_groups):
            rows = torch.tensor([b * num_beams + group * size + k for b in range(batch) for k in range(size)],
                                device=device)
            group_ids = ids[rows]
            candidates = (logits[rows] + sums[rows, None]).view(batch, size * vocab)
            top_sums, top = torch.topk(candidates, 2 * size, dim=1, largest=True, sorted=True)
            # on the host once per group: reading them element by element would sync a GPU thousands of times
            sources, tokens = torch.div(top, vocab, rounding_mode="floor").tolist(), (top % vocab).tolist()
            top_sums_host = top_sums.tolist()
            keep_sums = torch.zeros(batch, size, dtype=top_sums.dtype, device=device)
            keep_tokens = torch.zeros(batch, size, dtype=torch.long, device=device)
            keep_rows = torch.zeros(batch, size, dtype=torch.long, device=device)
            for b in range(batch):
                if done[b][group]:  # finished: its beams carry padding from here on
                    keep_tokens[b] = pad
                    continue
                kept = 0
                for rank in range(2 * size):
                    row = b * size + sources[b][rank]
                    if tokens[b][rank] == eot:
                        if rank < size:
                            finished[b][group].add(group_ids[row].clone(), top_sums_host[b][rank], length)
                    else:
                        keep_sums[b, kept], keep_tokens[b, kept], keep_rows[b, kept] = top_sums[b, rank], \
                            tokens[b][rank], row
                        kept += 1
                    if kept == size:
                        break
                done[b][group] = finished[b][group].cannot_improve(top_sums_host[b][0], length)
            sums[rows] = keep_sums.view(-1)
            ids[rows] = group_ids[keep_rows.view(-1)]
            new_tokens[rows] = keep_tokens.view(-1)
        ids = torch.cat([ids, new_tokens[:, None]], 1)
        if ids.shape[1] >= seq_len or all(all(d) for d in done):
            break
    for b in range(batch):  # running beams of unfinished groups compete with the finished hypotheses
        for group in range(num_groups):
            if not done[b][group]:
                for k in range(size):
                    row = b * num_beams + group * size + k
                    finished[b][group].add(ids[row], float(sums[row]), ids.shape[1])
    best = []
    for b in range(batch):
        candidates = [beam for group in finished[b] for beam in group.beams]
        best.append(sorted(candidates, key=lambda c: c[0])[-1][1])
    width = min(max(len(h) for h in best) + 1, seq_len)
    out = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for b, hyp in enumerate(best):
        out[b, :len(hyp)] = hyp
        if len(hyp) < width:
            out[b, len(hyp)] = eot
    return out
