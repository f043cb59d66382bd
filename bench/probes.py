"""Where does the answer's information live? Linear probes on a model's residual stream.

For "what color is the {noun}?" questions about held-out test scenes, one prefix-mode forward pass
(response fully masked, as at the first denoising step) gives every layer's states. A linear probe
(multinomial logistic regression, fit on the first 75% of the questions, scored on the rest) then
asks, per layer, whether the named object's colour can be read:

* at the named object's own image token (the cell the question points at), and
* at the first response position, where the answer is decoded.

High at the image token and low at the answer means the decoder finds and sees the object but
does not copy its content to where the answer is read. The script also prints the scale of the
visual tokens against the text embeddings (a pre-norm decoder can rewrite a token's state only
when the two are comparable).

For "is the X <relation> the Y?" questions it probes, at the last prompt position, the relation
word, the order of X's and Y's rows and of their columns, and the yes/no answer (the word applied
to the orders): operands readable but the word gone means the answer cannot be computed there.

    python bench/probes.py [--model checkpoints/mmdiff-tiny] [--compare OTHER_DIR] [--n 600]
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

import common


def _states(model, questions: list[str], images: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One prefix-mode forward with the 8-token response fully masked: (L+1, B, T, D) states, the
    prompt's token kinds (B, P) and the prompt length P."""
    embeds, valid, kinds = model.prepare(questions, images=images)
    P = embeds.shape[1]
    response = torch.full((len(questions), 8), model.special.mask)
    _, out = model.decoder.forward_response(embeds, valid, response, attn_mode="prefix", output_hidden_states=True)
    return torch.stack(out.hidden_states), kinds, P


def _questions(family: str, keep, n: int, seed: int) -> list:
    """``n`` test-split (QA, image) pairs of ``family`` whose question passes ``keep``."""
    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import render, sample_scene

    rng = random.Random(f"probes-{seed}")
    rows = []
    while len(rows) < n:
        scene = sample_scene(rng, "test")
        qa = ask(scene, rng, family)
        if qa is not None and keep(qa.question):
            rows.append((qa, render(scene, rng)))
    return rows


@torch.no_grad()
def collect(model, n: int, seed: int) -> dict[str, torch.Tensor]:
    """States (layers + 1, n, D) at the named object's image token and at the first response
    position, the colour labels (n,), and the adapter's token norms."""
    from mmdiff.data.scenes import COLOURS
    from mmdiff.model import IMAGE

    rows = _questions("attribute", lambda q: q.startswith("what color"), n, seed)
    at_image, at_answer, labels, norms = [], [], [], []
    for i in range(0, n, 50):
        chunk = rows[i:i + 50]
        states, kinds, P = _states(model, [qa.question for qa, _ in chunk], [im for _, im in chunk])
        embeds = states[0]
        for b, (qa, _) in enumerate(chunk):
            cells = (kinds[b] == IMAGE).nonzero().flatten()
            at_image.append(states[:, b, cells[qa.focus[0][0]]])
            at_answer.append(states[:, b, P])
            labels.append(COLOURS.index(qa.answers[0]))
            norms.append(embeds[b, cells].norm(dim=-1))
    return {"image": torch.stack(at_image, 1), "answer": torch.stack(at_answer, 1), "labels": torch.tensor(labels),
            "image_norm": torch.cat(norms).mean(), "text_norm": model.decoder.embed_tokens.weight.norm(dim=-1).mean()}


#: what the pair-relation probes read, with their class counts
PAIR_TARGETS = {"relation word": 4, "row order": 3, "column order": 3, "answer": 2}


@torch.no_grad()
def collect_pairs(model, n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """"is the X <relation> the Y?" questions: states (layers + 1, n, D) at the last prompt position
    (where the training readouts read) and the labels of :data:`PAIR_TARGETS`: the relation word,
    the order (<, =, >) of X's and Y's rows and of their columns, and the yes/no answer, which is
    the word applied to the orders."""
    from mmdiff.data.questions import DIRECTIONS
    from mmdiff.data.scenes import GRID

    rows = _questions("relation", lambda q: q.startswith("is the"), n, seed)
    states, labels = [], {k: [] for k in PAIR_TARGETS}
    for i in range(0, n, 50):
        chunk = rows[i:i + 50]
        h, _, P = _states(model, [qa.question for qa, _ in chunk], [im for _, im in chunk])
        states.append(h[:, :, P - 1])
        for qa, _ in chunk:
            (a,), (b,) = qa.focus[0], qa.focus[1]
            labels["relation word"].append(next(k for k, r in enumerate(DIRECTIONS) if f" {r} the " in qa.question))
            labels["row order"].append((a // GRID > b // GRID) - (a // GRID < b // GRID) + 1)
            labels["column order"].append((a % GRID > b % GRID) - (a % GRID < b % GRID) + 1)
            labels["answer"].append(int(qa.answers[0] == "yes"))
    return torch.cat(states, 1), {k: torch.tensor(v) for k, v in labels.items()}


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a logistic-regression probe (standardised features, L2 1e-3, Adam)."""
    n_fit = int(0.75 * len(y))
    mu, sd = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-5
    x = (x - mu) / sd
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[:n_fit] @ w + b, y[:n_fit]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n_fit:] @ w + b).argmax(1) == y[n_fit:]).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    from mmdiff.data.scenes import COLOURS

    p = common.parser(__doc__, seed=True)
    p.add_argument("--compare", help="a second model directory, probed the same way")
    p.add_argument("--n", type=int, default=600, help="questions per probe (75%% fit the probe, 25%% score it)")
    args = p.parse_args(argv)
    common.start(p, args)
    colour, scales, pairs = [], [], []
    for path in [args.model] + ([args.compare] if args.compare else []):
        model = common.load_model(args, path)
        data = collect(model, args.n, args.seed)
        for where in ("image", "answer"):
            accs = [probe_accuracy(h, data["labels"], len(COLOURS)) for h in data[where]]
            colour.append(f"| {path} | {'its image token' if where == 'image' else 'answer position'} | "
                          + " | ".join(f"{a:.2f}" for a in accs) + " |")
        scales.append(f"| {path} | {data['image_norm']:.2f} | {data['text_norm']:.2f} | "
                      f"{data['image_norm'] / data['text_norm']:.0f} |")
        states, labels = collect_pairs(model, args.n, args.seed)
        pairs += [f"| {path} | {name} | " + " | ".join(f"{probe_accuracy(h, labels[name], k):.2f}" for h in states) + " |"
                  for name, k in PAIR_TARGETS.items()]
    layers = " | ".join(f"h{i}" for i in range(model.decoder.cfg.n_layers + 1))
    rule = "|---|---|" + "---|" * (model.decoder.cfg.n_layers + 1)
    print("colour of the named object, linear-probe accuracy per residual-stream index (0 = embeddings); "
          f"chance {1 / len(COLOURS):.3f}")
    print(f"| model | read at | {layers} |", rule, *colour, sep="\n")
    print("\n| model | visual token norm | text embedding norm | ratio |\n|---|---|---|---|", *scales, sep="\n")
    print('\n"is the X <relation> the Y?", read at the last prompt position (where the training readouts read); '
          "chance: word 0.25, orders about 0.4, answer 0.5")
    print(f"| model | target | {layers} |", rule, *pairs, sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
