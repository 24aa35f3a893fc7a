"""One training or validation batch: token ids, next-token targets, and where each document starts.

Every loader (train and val) yields `Batch`. The document boundaries come from the loader, which knows them from
the index it packed the sequences with; nothing scans for `<|endoftext|>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # target value the loss skips (padding); torch's cross_entropy default


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, S) int64 token ids fed to the model
    targets: torch.Tensor  # (B, S) int64 next-token targets; IGNORE_INDEX where the loss ignores (padding)
    positions: torch.Tensor  # (B, S) int64 position of each token within its document (0 at each document start)
    cu_seqlens: torch.Tensor  # (n+1,) int32 document starts over the flattened B*S inputs: 0, ..., B*S

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(
            inputs=self.inputs.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
            positions=self.positions.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        # called by torch's DataLoader when pin_memory=True
        return Batch(
            self.inputs.pin_memory(),
            self.targets.pin_memory(),
            self.positions.pin_memory(),
            self.cu_seqlens.pin_memory(),
        )

    @property
    def shape(self) -> torch.Size:
        return self.inputs.shape

    @property
    def num_tokens(self) -> int:
        """Tokens the loss counts (targets that are not IGNORE_INDEX)."""
        return int((self.targets != IGNORE_INDEX).sum())

    @staticmethod
    def from_rows(
        rows: torch.Tensor,
        starts: list[list[int]] | None = None,
        used: list[int] | None = None,
        unrelated_next: list[list[int]] | None = None,
    ) -> Batch:
        """A batch from (B, S+1) token rows: inputs = rows[:, :-1], targets = rows[:, 1:].

        starts[b]: offsets in row b where a document starts (None: one document per row). used[b]: tokens of row b
        that are not padding (None: all); targets that are padding become IGNORE_INDEX, and the padding is a
        segment of its own. Segments also start at every row start, so a document cut by a row restarts there at
        position 0 (a row never sees an earlier row). unrelated_next[b]: offsets whose next token in the row is
        another document's (a cut piece's end, best_fit): their targets become IGNORE_INDEX too.
        """
        if rows.dim() != 2 or rows.shape[1] < 2:
            raise ValueError(f"rows must be (B, S+1) with S >= 1, got shape {tuple(rows.shape)}")
        rows = rows.long()
        B, S = rows.shape[0], rows.shape[1] - 1
        inputs = rows[:, :-1].contiguous()  # (B, S)
        targets = rows[:, 1:].clone()  # (B, S)
        positions = torch.empty(B, S, dtype=torch.long)
        cu: list[int] = []
        index = torch.arange(S, dtype=torch.long)
        for b in range(B):
            segment = {0, *(starts[b] if starts is not None else ())}
            if used is not None and used[b] < S + 1:
                targets[b, max(used[b] - 1, 0) :] = IGNORE_INDEX  # the target of position j is rows[b, j + 1]
                segment.add(used[b])
            for j in unrelated_next[b] if unrelated_next is not None else ():
                targets[b, j] = IGNORE_INDEX
            segment = sorted(s for s in segment if 0 <= s < S)
            start_of = torch.zeros(S, dtype=torch.long)  # (S,) the start of the segment each position lies in
            for s in segment[1:]:
                start_of[s:] = s
            positions[b] = index - start_of
            cu.extend(b * S + s for s in segment)
        cu.append(B * S)
        return Batch(inputs, targets, positions, torch.tensor(cu, dtype=torch.int32))
