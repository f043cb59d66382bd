"""Training-only heads and their losses: per-cell classifiers on the vision encoder (grounding
stage) and probes on the decoder's states (:class:`GroundHead`). Their targets come from the scene
generator and the question templates, never from model inputs; none of them is saved with the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.questions import OPERATORS, operator_of
from ..data.scenes import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES
from ..encoders.audio import AudioFeatures
from ..model import IMAGE
from .banks import SceneBank
from .batches import Example


class CTCHead(nn.Module):
    """A training-only linear CTC head over the encoder's final states, for models whose audio adapter has
    none of its own; ``logits`` as :meth:`mmdiff.adapters.audio.CTCAdapter.logits`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def logits(self, feats: AudioFeatures) -> torch.Tensor:
        """(B, T, vocab + 1) per-frame CTC logits."""
        return self.linear(feats.last)


class CellHead(nn.Module):
    """Per-cell classifiers on grid-pooled encoder tokens (encoder grounding stage only)."""

    def __init__(self, dim: int, grid: tuple[int, int], n_cells: int = 3, n_classes: dict[str, int] | None = None) -> None:
        super().__init__()
        self.grid, self.n_cells = grid, n_cells
        self.heads = nn.ModuleDict({k: nn.Linear(dim, v) for k, v in (n_classes or {}).items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        B, N, C = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, C, *self.grid)  # (B, C, h, w)
        x = F.adaptive_avg_pool2d(x, self.n_cells).flatten(2).transpose(1, 2)  # (B, 9, C)
        return {k: h(x) for k, h in self.heads.items()}  # name -> (B, 9, classes)


def cell_states(tokens: torch.Tensor) -> torch.Tensor:
    """The image-token states ``tokens`` (B, N, D) as one state per grid cell (B, GRID * GRID, D): unchanged
    when there is one token per cell (the shipped model's 2x2-pooled projector); a finer square patch grid
    (a token-rich model: 6 x 6 patches, 36 tokens) is average-pooled to the cells, so the cell probes
    read the mean of each cell's patches."""
    B, N, D = tokens.shape
    if N == GRID * GRID:
        return tokens
    side = round(N ** 0.5)
    if side * side != N or side % GRID:
        raise ValueError(f"{N} image tokens are not a square patch grid divisible into {GRID} x {GRID} cells")
    x = tokens.transpose(1, 2).reshape(B, D, side, side)
    return F.adaptive_avg_pool2d(x, GRID).flatten(2).transpose(1, 2)


def _probe_loss(probes: nn.ModuleDict, state: torch.Tensor, targets: dict[str, list[tuple[int, int]]]) -> torch.Tensor:
    """Sum over probes k of the cross-entropy of ``probes[k]`` on the rows of ``state`` (B, D) that
    ``targets[k]`` lists as (row, class); probes without targets are skipped (zero when none has any)."""
    losses = [F.cross_entropy(probes[k](state[[b for b, _ in t]]).float(), torch.tensor([y for _, y in t], device=state.device))
              for k, t in targets.items() if t]
    return torch.stack(losses).sum() if losses else state.new_zeros(())


class GroundHead(nn.Module):
    """Training-only probes on the decoder's states.

    On the image-token states (one per grid cell; finer patch grids pooled to cells by :func:`cell_states`):
    ``focus`` (3 logits per cell): is the cell in focus group 1, 2, 3 of the question
    (:attr:`mmdiff.data.questions.QA.focus`: named object, second object, relation region).
    ``rank`` (MAX_OBJECTS + 1 classes per cell): the cell's object index in reading order, or
    "empty" (the order the captions list objects in). See :meth:`ground_loss`.

    On the last prompt state (the one the answer is read from), when ``readout`` is set: per focus
    group 1 and 2, the number of objects in the group and, when the group is one cell, that cell's
    index and its shape, colour and size (or "empty"): the intermediate values of every question
    (see :meth:`readout_loss`).

    On the same state one block later, when ``relate`` is set: the order (<, =, >) of the two
    groups' rows, columns (one-cell groups) and counts, and the operator the question applies to
    them (see :meth:`relate_loss`).
    """

    READOUT_GROUPS = 2
    RELATE = ("row", "col", "count", "op")

    def __init__(self, dim: int, n_groups: int = 3, readout: bool = False, relate: bool = False) -> None:
        super().__init__()
        self.n_groups = n_groups
        self.focus = nn.Linear(dim, n_groups)
        self.rank = nn.Linear(dim, MAX_OBJECTS + 1)
        classes = {"shape": len(SHAPES) + 1, "colour": len(COLOURS) + 1, "size": len(SIZES) + 1,
                   "cell": GRID * GRID, "count": MAX_OBJECTS + 1}
        self.readout = nn.ModuleDict({f"{g}_{k}": nn.Linear(dim, n) for g in range(self.READOUT_GROUPS)
                                      for k, n in classes.items()}) if readout else None
        self.relate = nn.ModuleDict({k: nn.Linear(dim, len(OPERATORS) + 1 if k == "op" else 3)
                                     for k in self.RELATE}) if relate else None

    def ground_loss(self, hidden: list[torch.Tensor], kinds: torch.Tensor, items: list[Example], bank: SceneBank, *,
                    layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Grounding: the decoder's state at each image token (one per cell) predicts whether the
        question names that cell (focus group 1), its second object/group (group 2) or the region
        its relation selects (group 3); and, whatever the question, the cell's rank among the
        scene's objects in reading order (or "empty").

        Image tokens follow the question in the prompt, so they can attend to it under every mask.
        The dense per-cell targets teach the two-hop lookups (find the reference, then the cells
        in relation to it; find the k-th object) that one answer token per question teaches slowly.

        Args:
            hidden: the decoder's residual stream, one (B, P + L, D) tensor per layer.
            kinds: (B, P) position kinds of the prompt (:data:`mmdiff.model.IMAGE` for image tokens).
            items: the batch's items; those with a bank scene have targets.
            bank: the scene bank ``items`` index.
            layer: residual-stream index read (-1: the middle of the decoder).

        Returns:
            (focus BCE, rank cross-entropy), each a scalar (zero when no row has an image).
        """
        rows = [b for b, e in enumerate(items) if e.scene >= 0]
        zero = hidden[0].new_zeros(())
        if not rows:
            return zero, zero
        layer = layer if layer >= 0 else len(hidden) // 2
        img = kinds[rows] == IMAGE  # (B', P)
        h = hidden[layer][rows, : img.shape[1]]  # (B', P, D): prompt positions
        states = cell_states(h[img].view(len(rows), int(img[0].sum()), -1))  # (B', cells, D) in reading order
        n_cells = states.shape[1]
        rank_target = torch.full((len(rows), n_cells), self.rank.out_features - 1, dtype=torch.long)
        focus_target = torch.zeros(len(rows), n_cells, self.n_groups)
        has_focus = torch.zeros(len(rows), dtype=torch.bool)
        for r, b in enumerate(rows):
            for k, obj in enumerate(bank.scenes[items[b].scene].objects):
                rank_target[r, obj.cell] = k
            for g, cells in enumerate(items[b].focus[:self.n_groups]):
                focus_target[r, list(cells), g] = 1.0
            has_focus[r] = bool(items[b].focus)
        rank = F.cross_entropy(self.rank(states).float().reshape(-1, self.rank.out_features),
                               rank_target.reshape(-1).to(states.device))
        if not has_focus.any():
            return zero, rank
        sel = has_focus.to(states.device)
        focus = F.binary_cross_entropy_with_logits(self.focus(states[sel]).float(), focus_target[has_focus].to(states.device))
        return focus, rank

    def readout_loss(self, hidden: list[torch.Tensor], pos: int, items: list[Example], bank: SceneBank, *,
                     layer: int = -1) -> torch.Tensor:
        """Answer-cell readout: the state at ``pos`` (the last prompt position P - 1, which left
        padding keeps fixed; with ``readout_at_response`` also the first response position P)
        predicts, per focus group g in {1, 2}, the number of objects in the group and, when the
        group is one cell, that cell's index, shape, colour and size (class 0: empty).
        Cross-entropies summed over the probes, averaged over the groups.

        These are the intermediate values every question family is computed from (the colour of
        the named object, the neighbour a relation points at, the two counts a comparison
        compares, the cells of a relation pair). Probes show the named cell's colour decodable at
        its image token but not where the answer is read: the answer loss alone, one token per
        question, teaches the copy slowly; this dense target teaches it on every question. Like
        the focus labels, the targets come from the scene generator and are never model inputs.

        Args:
            hidden: the decoder's residual stream, one (B, P + L, D) tensor per layer.
            pos: the position read.
            items: the batch's items; those with a bank scene and focus groups have targets.
            bank: the scene bank ``items`` index (its per-cell labels are the targets).
            layer: residual-stream index read (-1: two blocks before the output).
        """
        layer = layer if layer >= 0 else len(hidden) - 3
        state = hidden[layer][:, pos]  # (B, D)
        targets: dict[str, list[tuple[int, int]]] = {k: [] for k in self.readout}
        for b, e in enumerate(items):
            if e.scene < 0 or not e.focus:
                continue
            labels = {a: v[e.scene].tolist() for a, v in bank.labels.items()}  # the bank's per-cell labels
            for g, cells in enumerate(e.focus[:self.READOUT_GROUPS]):
                targets[f"{g}_count"].append((b, sum(labels["shape"][c] > 0 for c in cells)))
                if len(cells) == 1:
                    (c,) = cells
                    targets[f"{g}_cell"].append((b, c))
                    for a in ("shape", "colour", "size"):
                        targets[f"{g}_{a}"].append((b, labels[a][c]))
        return _probe_loss(self.readout, state, targets) / self.READOUT_GROUPS

    def relate_loss(self, hidden: list[torch.Tensor], pos: int, items: list[Example], bank: SceneBank, *,
                    layer: int = -1) -> torch.Tensor:
        """Comparison readout on the state at ``pos`` (as the readout): for questions with two focus groups, the
        order of group 1 against group 2 as one of (<, =, >): their object counts and, when both
        groups are one cell, their rows and their columns; for every question with an image, the
        operator it applies (:data:`~mmdiff.data.questions.OPERATORS`: "left of", ..., "more",
        ...; or none). Cross-entropies summed over the probes.

        The yes/no families answer operator x order ("is the X left of the Y?" is col(X) < col(Y);
        "are there more X than Y?" is count(X) > count(Y)). ``bench/probes.py`` on a model trained
        with the readout alone (recipe v3): both orders are linearly readable at this state from
        block 4 (0.83-0.93), but the relation word, readable at 0.82 after block 2, falls to 0.49
        once the operands arrive, and pair relations stay near chance. The operator target keeps
        the word beside its operands (1.00 at every block in recipe v4), so the last block can
        combine them. It reads one block after the readout. Targets come from the scene generator
        and the question template.

        Args:
            hidden: the decoder's residual stream, one (B, P + L, D) tensor per layer.
            pos: the position read.
            items: the batch's items; those with a bank scene have targets.
            bank: the scene bank ``items`` index.
            layer: residual-stream index read (-1: one block before the output).
        """
        layer = layer if layer >= 0 else len(hidden) - 2
        state = hidden[layer][:, pos]
        targets: dict[str, list[tuple[int, int]]] = {k: [] for k in self.relate}

        def order(a: int, b: int) -> int:  # 0: a < b, 1: equal, 2: a > b
            return (a > b) - (a < b) + 1

        for b, e in enumerate(items):
            if e.scene < 0:
                continue
            op = operator_of(e.question)
            targets["op"].append((b, len(OPERATORS) if op is None else OPERATORS.index(op)))
            if len(e.focus) < 2:
                continue
            occupied = bank.labels["shape"][e.scene]  # (cells,): 0 = empty
            g1, g2 = e.focus[0], e.focus[1]
            targets["count"].append((b, order(int((occupied[list(g1)] > 0).sum()), int((occupied[list(g2)] > 0).sum()))))
            if len(g1) == 1 and len(g2) == 1:
                targets["row"].append((b, order(g1[0] // GRID, g2[0] // GRID)))
                targets["col"].append((b, order(g1[0] % GRID, g2[0] % GRID)))
        return _probe_loss(self.relate, state, targets)
