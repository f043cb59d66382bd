"""Vision adapters: patch tokens -> (optional k x k grid pooling) -> projection -> (optional position embedding).

``mlp2x_gelu`` is LLaVA-1.5's projector (Linear -> GELU -> Linear); its ``proj.0`` / ``proj.2`` are
LLaDA-V's ``mm_projector.0`` / ``mm_projector.2``. Pooling the grid before projecting is LaViDa's
token compression (2 x 2 there); a 9 x 9 grid pooled 3 x 3 gives one token per cell of a 3 x 3 scene.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ADAPTERS, AdapterConfig

POS_EMBED_SCALE = 0.5  # std of the initial position embedding: large enough to tell positions apart


def pool_grid(tokens: torch.Tensor, grid: tuple[int, int], k: int, name: str = "adapter") -> torch.Tensor:
    """k x k average pooling of row-major patch tokens on an (h, w) grid: (B, h*w, D) -> (B, (h/k)*(w/k), D).

    Raises ValueError (naming ``name``) when the tokens do not form the grid.
    """
    B, N, D = tokens.shape
    if N != grid[0] * grid[1]:
        raise ValueError(f"{name}: {N} tokens do not form the {grid[0]}x{grid[1]} grid")
    x = tokens.transpose(1, 2).reshape(B, D, *grid)  # (B, D, h, w)
    return F.avg_pool2d(x, k).flatten(2).transpose(1, 2)  # (B, h*w/k^2, D)


class VisionAdapter(nn.Module):
    """Pool the patch grid, project with ``proj``, optionally RMS-normalise, add a learned embedding per output token.

    ``norm`` keeps the visual tokens at a fixed scale (RMS 1 per channel, learned gain) whatever the
    encoder's feature scale. Unnormalised, a jointly trained projector drifts to token norms hundreds
    of times the text embeddings', where the decoder's residual updates can no longer rewrite them.

    Args:
        cfg: sizes (``pool``, ``grid``, ``norm``, ``pos_embed``, ``in_dim``, ``out_dim``).
        proj: maps (..., in_dim) -> (..., out_dim).
    """

    modality = "image"

    def __init__(self, cfg: AdapterConfig, proj: nn.Module) -> None:
        super().__init__()
        if cfg.pool < 1:
            raise ValueError(f"{cfg.kind}: pool must be >= 1, got {cfg.pool}")
        if (cfg.pool > 1 or cfg.pos_embed) and cfg.grid is None:
            raise ValueError(f"{cfg.kind}: grid (patch grid h, w) is required when pool > 1 or pos_embed")
        if cfg.grid is not None and (cfg.grid[0] % cfg.pool or cfg.grid[1] % cfg.pool):
            raise ValueError(f"{cfg.kind}: grid {cfg.grid} is not divisible by pool {cfg.pool}")
        self.cfg = cfg
        self.proj = proj
        self.norm = nn.RMSNorm(cfg.out_dim, eps=1e-6) if cfg.norm else None
        self.pos_embed = None
        if cfg.pos_embed:
            n_out = (cfg.grid[0] // cfg.pool) * (cfg.grid[1] // cfg.pool)
            self.pos_embed = nn.Parameter(torch.randn(n_out, cfg.out_dim) * POS_EMBED_SCALE)  # (N', out)

    def num_tokens(self, n_in: int) -> int:
        """Output tokens for ``n_in`` input patch tokens."""
        self._check_grid(n_in)
        return n_in // (self.cfg.pool * self.cfg.pool)

    def _check_grid(self, n_in: int) -> None:
        grid = self.cfg.grid
        if grid is not None and n_in != grid[0] * grid[1]:
            raise ValueError(f"{self.cfg.kind}: {n_in} tokens do not form the {grid[0]}x{grid[1]} grid")

    def pool_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """k x k average pooling of row-major patch tokens: (B, h*w, D) -> (B, (h/k)*(w/k), D)."""
        if self.cfg.pool == 1:
            return tokens
        return pool_grid(tokens, self.cfg.grid, self.cfg.pool, self.cfg.kind)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) patch tokens -> (B, N', out_dim)."""
        self._check_grid(tokens.shape[1])
        x = self.proj(self.pool_grid(tokens))  # (B, N', out_dim)
        if self.norm is not None:
            x = self.norm(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x


@ADAPTERS.register("mlp2x_gelu")
class MLP2xGELU(VisionAdapter):
    """LLaVA-1.5 / LLaDA-V projector: Linear(in, out) -> GELU -> Linear(out, out)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__(cfg, nn.Sequential(nn.Linear(cfg.in_dim, cfg.out_dim), nn.GELU(),
                                            nn.Linear(cfg.out_dim, cfg.out_dim)))


@ADAPTERS.register("linear")
class LinearAdapter(VisionAdapter):
    """LLaVA-1's projector: one Linear(in, out)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__(cfg, nn.Linear(cfg.in_dim, cfg.out_dim))


def scene_words() -> dict[str, list[str]]:
    """The scene world's class names per cell attribute (index 0: empty cell, as in
    :func:`mmdiff.data.scenes.cell_labels`) and the cell names in reading order."""
    from ..data.questions import NOTHING
    from ..data.scenes import COLOURS, POSITIONS, SHAPES, SIZES

    return {"shape": [NOTHING, *SHAPES], "colour": [NOTHING, *COLOURS], "size": [NOTHING, *SIZES],
            "position": list(POSITIONS)}


@ADAPTERS.register("cell_words")
class CellWordAdapter(nn.Module):
    """Lexical visual tokens: per grid cell, classifiers name its shape, colour and size, and the
    cell becomes the bag of those words plus its position's words, embedded with the decoder's
    own token table (``emits = "vocab"``, like :class:`~mmdiff.adapters.audio.CTCAdapter`).

    A cell token is ``sum_a sum_c p_a(c) E[w_a(c)] + sum_{w in pos(cell)} E[w]``: the decoder
    reads an image as it reads words, so grounding a question ("the large circle", "left of") is
    matching words, and answering is copying them. This is the symbolic end of the projector
    spectrum (discrete visual words, cf. LaVIT / SEED tokenizers, and the CTC compression of the
    speech path); the classifiers are trained on the scene generator's per-cell labels
    (``cell_logits``) and the rest of the model never sees a label.

    Config: ``in_dim``, ``grid`` (patch grid), ``pool`` (patches per cell side), ``vocab_size``,
    ``words`` (default :func:`scene_words`), ``word_ids`` (token ids of ``words``),
    ``position_weight`` / ``empty_weight`` (bag weights), ``pos_embed`` (a learned per-cell vector
    added after embedding).

    Measured on the scene world (``bench/sweeps/vision-adapter``): the decoder learns *slower* from
    these tokens than from the ``mlp2x_gelu`` projector (existence near chance after 700 AR steps,
    against 90%), so the shipped recipe does not use it.
    """

    modality = "image"
    emits = "vocab"

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        if cfg.grid is None:
            raise ValueError(f"{cfg.kind}: grid (patch grid h, w) is required")
        if cfg.grid[0] % cfg.pool or cfg.grid[1] % cfg.pool:
            raise ValueError(f"{cfg.kind}: grid {cfg.grid} is not divisible by pool {cfg.pool}")
        if cfg.vocab_size < 1 or cfg.word_ids is None:
            raise ValueError(f"{cfg.kind}: vocab_size and word_ids must be set (MultimodalDiffusionLM sets them "
                             "from its tokenizer)")
        self.cfg = cfg
        self.n_cells = (cfg.grid[0] // cfg.pool) * (cfg.grid[1] // cfg.pool)
        words = {k: v for k, v in cfg.word_ids.items() if k != "position"}
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.in_dim, len(v)) for k, v in words.items()})
        for k, ids in cfg.word_ids.items():
            if k == "position" and len(ids) != self.n_cells:
                raise ValueError(f"{cfg.kind}: {len(ids)} position names for {self.n_cells} cells")
            bags = self._bags(ids, cfg.vocab_size)  # (C, V)
            if k == "position":
                bags = bags * cfg.position_weight
            else:
                bags[0] = bags[0] * cfg.empty_weight  # class 0: the empty cell
            self.register_buffer(f"bag_{k}", bags, persistent=False)
        self.pos_embed = None  # optional learned per-cell vector, added in decoder space (MultimodalDiffusionLM.adapt_image)
        if cfg.pos_embed:
            self.pos_embed = nn.Parameter(torch.randn(self.n_cells, cfg.out_dim) * POS_EMBED_SCALE)

    @staticmethod
    def _bags(ids: list[list[list[int]]], vocab: int) -> torch.Tensor:
        """(classes, vocab): each class's spellings (token id lists) summed, averaged over spellings."""
        bags = torch.zeros(len(ids), vocab)
        for c, forms in enumerate(ids):
            for form in forms:
                for t in form:
                    bags[c, t] += 1.0 / len(forms)
        return bags

    @staticmethod
    def resolve(words: dict[str, list[str]], tokenize) -> dict[str, list[list[list[int]]]]:
        """``words`` as token ids, each name in the spellings the decoder meets it in: sentence-initial
        ("red"), after a space (" red") and as a JSON value (``"color": "red"``).

        Args:
            words: attribute -> class names.
            tokenize: text -> token ids (no special tokens).
        """
        prefix = tokenize('a: "')

        def json_value(name: str) -> list[int]:
            full = tokenize(f'a: "{name}"')
            return full[len(prefix):-1] if full[:len(prefix)] == prefix and len(full) > len(prefix) + 1 else []

        out = {}
        for k, names in words.items():
            out[k] = []
            for n in names:
                forms = [f for f in (tokenize(n), tokenize(" " + n), json_value(n)) if f]
                if not forms:
                    raise ValueError(f"cell_words: the {k} name {n!r} tokenises to nothing")
                out[k].append(list(map(list, dict.fromkeys(map(tuple, forms)))))  # distinct spellings
        return out

    def num_tokens(self, n_in: int) -> int:
        return self.n_cells

    def cell_logits(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, h*w, in_dim) patch tokens -> attribute -> (B, cells, classes) logits."""
        x = pool_grid(tokens, self.cfg.grid, self.cfg.pool, self.cfg.kind)  # (B, cells, in_dim)
        return {k: h(x) for k, h in self.heads.items()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, in_dim) -> (B, cells, vocab) word weights (embed with the decoder's table)."""
        out = self.bag_position.to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # (B, cells, V)
        for k, logits in self.cell_logits(tokens).items():
            out = out + logits.softmax(-1) @ getattr(self, f"bag_{k}").to(logits.dtype)
        return out
