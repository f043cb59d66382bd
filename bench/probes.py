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

    python bench/probes.py [--model checkpoints/mmdiff-tiny] [--compare OTHER_DIR] [--n 600]
"""
from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from mmdiff import DEFAULT_MODEL_DIR


def collect(model, n: int, seed: int) -> dict[str, torch.Tensor]:
    """States (layers + 1, n, D) at the named object's image token and at the first response
    position, the colour labels (n,), and the adapter's token norms."""
    from mmdiff.data.questions import ask
    from mmdiff.data.scenes import COLOURS, render, sample_scene
    from mmdiff.model import IMAGE

    rng = random.Random(f"probes-{seed}")
    rows = []
    while len(rows) < n:
        scene = sample_scene(rng, "test")
        qa = ask(scene, rng, "attribute")
        if qa is not None and qa.question.startswith("what color"):
            rows.append((qa, render(scene, rng)))
    at_image, at_answer, labels, norms = [], [], [], []
    with torch.no_grad():
        for i in range(0, n, 50):
            chunk = rows[i:i + 50]
            embeds, valid, kinds = model.prepare([qa.question for qa, _ in chunk], images=[im for _, im in chunk])
            P = embeds.shape[1]
            response = torch.full((len(chunk), 8), model.special.mask)
            x = torch.cat([embeds, model.decoder.embed(response)], 1)
            out = model.decoder(inputs_embeds=x, valid=torch.cat([valid, torch.ones_like(response, dtype=torch.bool)], 1),
                                attn_mode="prefix", prefix_len=P, output_hidden_states=True)
            states = torch.stack(out.hidden_states)  # (L+1, B, T, D)
            for b, (qa, _) in enumerate(chunk):
                cells = (kinds[b] == IMAGE).nonzero().flatten()
                at_image.append(states[:, b, cells[qa.focus[0][0]]])
                at_answer.append(states[:, b, P])
                labels.append(COLOURS.index(qa.answers[0]))
                norms.append(embeds[b, cells].norm(dim=-1))
    return {"image": torch.stack(at_image, 1), "answer": torch.stack(at_answer, 1), "labels": torch.tensor(labels),
            "image_norm": torch.cat(norms).mean(), "text_norm": model.decoder.embed_tokens.weight.norm(dim=-1).mean()}


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
    from mmdiff.model import MultimodalDiffusionLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL_DIR)
    p.add_argument("--compare", help="a second model directory, probed the same way")
    p.add_argument("--n", type=int, default=600, help="questions (75%% fit the probe, 25%% score it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [args.model] + ([args.compare] if args.compare else [])
    print("colour of the named object, linear-probe accuracy per residual-stream index (0 = embeddings); "
          f"chance {1 / len(COLOURS):.3f}")
    scales = []
    for path in models:
        model = MultimodalDiffusionLM.from_pretrained(path).eval()
        if not scales:
            print("| model | read at | " + " | ".join(f"h{i}" for i in range(model.decoder.cfg.n_layers + 1)) + " |")
        data = collect(model, args.n, args.seed)
        for where in ("image", "answer"):
            accs = [probe_accuracy(h, data["labels"], len(COLOURS)) for h in data[where]]
            print(f"| {path} | {'its image token' if where == 'image' else 'answer position'} | "
                  + " | ".join(f"{a:.2f}" for a in accs) + " |")
        scales.append((path, data["image_norm"].item(), data["text_norm"].item()))
    print("\n| model | visual token norm | text embedding norm | ratio |\n|---|---|---|---|")
    for path, img, txt in scales:
        print(f"| {path} | {img:.2f} | {txt:.2f} | {img / txt:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
