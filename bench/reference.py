"""PyTorch reference for `scripts/bench.sh`: the work of the official LLM-ESR
code (github.com/Applied-Machine-Learning-Lab/LLM-ESR), written here in its
structure (not copied), timed the way `llm-esr-orch bench` times ours.

Work (`--what`):
  sasrec  the plain SASRec training step of the official `SASRec_seq`: batch
          padded to L, one positive and one sampled negative per position,
          BCE on (pos, neg) logits masked on padding, Adam.
  llmesr  the LLM-ESR-SASRec training step of the official `LLMESR_SASRec`:
          dual view (frozen LLM table -> adapter at every padded position,
          PCA-initialised collaborative table), cross-attention both ways,
          one shared encoder run twice, seq-to-seq BCE, a second student
          pass, and the teachers (10 similar users per user, padded to L)
          encoded inside the step with gradients on, then detached; MSE
          distillation, alpha 0.1.
  eval    one evaluation pass of plain SASRec over every user with at least
          3 interactions: validation input padded to L, target + 100 sampled
          negatives scored, ranks by double argsort (official `SeqTrainer.eval`).
  embed   sentence-transformers encoding of the prompts in `--prompts`.

Inputs: the sequences of a prepared dataset (`inter.txt`, `user item` a
line, time-ordered); the LLM item table from `--item-emb` (`.npy`, one row
per item, row 0 = item 1; random vectors are fine: only the shape matters
for time), its PCA as the collaborative table's start; similar users drawn
at random (seeded). Prints one JSON line.
"""

import argparse
import json
import math
import os
import random
import resource
import time
import warnings

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only; the wheel's CUDA libraries stay idle
warnings.filterwarnings("ignore", message="CUDA initialization")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["sasrec", "llmesr", "eval", "embed"], required=True)
    p.add_argument("--data", help="prepared dataset directory (inter.txt)")
    p.add_argument("--item-emb", help="LLM item table, .npy (items x D)")
    p.add_argument("--prompts", help="JSON string a line (embed)")
    p.add_argument("--model", help="sentence-transformers model directory (embed)")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--embed-batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sim-users", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=5, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


# ---------------------------------------------------------------- data


def read_sequences(data_dir):
    """`seqs[u]`: the items of user u + 1, in file order."""
    seqs = {}
    with open(f"{data_dir}/inter.txt") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                seqs.setdefault(int(parts[0]), []).append(int(parts[1]))
    return [seqs[u] for u in sorted(seqs)]


def left_pad(items, max_len):
    """Last `max_len` items, left-padded with 0, and their positions 1..n."""
    items = items[-max_len:]
    pad = max_len - len(items)
    return [0] * pad + items, [0] * pad + list(range(1, len(items) + 1))


def random_neq(num_items, exclude):
    while True:
        j = random.randint(1, num_items)
        if j not in exclude:
            return j


def seq2seq_sample(train, num_items, max_len):
    """The official `Seq2SeqDataset` sample of one user's training part."""
    exclude = set(train)
    seq, positions = left_pad(train[:-1], max_len)
    pos, _ = left_pad(train[1:], max_len)
    neg = [random_neq(num_items, exclude) if p else 0 for p in pos]
    return seq, pos, neg, positions


def training_batches(seqs, num_items, args, steps):
    """`steps` batches of the official loader, shuffled users; with the
    similar users' sequences (`train[:-1]`, as `_get_user_seq`) for LLM-ESR."""
    train = [s[:-2] if len(s) >= 3 else s for s in seqs]
    order = list(range(len(train)))
    random.shuffle(order)
    batches = []
    for k in range(steps):
        users = [order[(k * args.batch + i) % len(order)] for i in range(args.batch)]
        cols = list(zip(*[seq2seq_sample(train[u], num_items, args.max_len) for u in users]))
        batch = {name: torch.tensor(c, dtype=torch.long) for name, c in zip(["seq", "pos", "neg", "positions"], cols)}
        if args.what == "llmesr":
            sim = [left_pad(train[v][:-1], args.max_len) for u in users for v in random.sample(range(len(train)), args.sim_users)]
            batch["sim_seq"] = torch.tensor([s for s, _ in sim], dtype=torch.long)
            batch["sim_positions"] = torch.tensor([p for _, p in sim], dtype=torch.long)
        batches.append(batch)
    return batches


def eval_batches(seqs, num_items, args):
    """Validation input (`seq[:-2]`), target `seq[-2]`, 100 negatives outside
    the evaluated sequence, for every user with at least 3 items."""
    users = [s for s in seqs if len(s) >= 3]
    batches = []
    for k in range(0, len(users), args.eval_batch):
        rows = []
        for s in users[k : k + args.eval_batch]:
            seq, positions = left_pad(s[:-2], args.max_len)
            exclude = set(s[:-1])
            cand = [s[-2]] + [random_neq(num_items, exclude) for _ in range(100)]
            rows.append((seq, positions, cand))
        seq, positions, cand = zip(*rows)
        batches.append({name: torch.tensor(c, dtype=torch.long) for name, c in zip(["seq", "positions", "item_indices"], [seq, positions, cand])})
    return batches


# ---------------------------------------------------------------- model


class FeedForward(nn.Module):
    """Official `PointWiseFeedForward`: Conv1d(k=1), dropout, ReLU, Conv1d, dropout, residual."""

    def __init__(self, d, p):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(d, d, 1), nn.Conv1d(d, d, 1)
        self.drop1, self.drop2 = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x):
        y = self.drop2(self.conv2(F.relu(self.drop1(self.conv1(x.transpose(-1, -2))))))
        return y.transpose(-1, -2) + x


class Encoder(nn.Module):
    """Official `SASRecBackbone`: pre-LN blocks, torch MultiheadAttention with
    no attention mask (as shipped), padding rows zeroed, final LayerNorm."""

    def __init__(self, args):
        super().__init__()
        d = args.hidden
        self.attn_norms = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(args.blocks)])
        self.attns = nn.ModuleList([nn.MultiheadAttention(d, args.heads, args.dropout) for _ in range(args.blocks)])
        self.ffn_norms = nn.ModuleList([nn.LayerNorm(d, eps=1e-8) for _ in range(args.blocks)])
        self.ffns = nn.ModuleList([FeedForward(d, args.dropout) for _ in range(args.blocks)])
        self.last_norm = nn.LayerNorm(d, eps=1e-8)

    def forward(self, x, ids):
        keep = (ids != 0).unsqueeze(-1)
        x = x * keep
        for attn_norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            x = x.transpose(0, 1)
            q = attn_norm(x)
            a, _ = attn(q, x, x)
            x = (q + a).transpose(0, 1)
            x = ffn(ffn_norm(x)) * keep
        return self.last_norm(x)


def xavier_init(model, skip=()):
    """Official `_init_weights`: Xavier-normal for every parameter of 2+
    dimensions except the pretrained tables."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not any(s in name for s in skip):
            nn.init.xavier_normal_(p.data)


def bce(pos_logits, neg_logits, pos):
    """Official loss: BCEWithLogits mean over positives + over negatives, non-padding positions."""
    m = pos != 0
    return F.binary_cross_entropy_with_logits(pos_logits[m], torch.ones_like(pos_logits[m])) + F.binary_cross_entropy_with_logits(
        neg_logits[m], torch.zeros_like(neg_logits[m])
    )


class SASRec(nn.Module):
    """Official `SASRec_seq`: item table (items + 2 rows), positional table
    (max_len + 100 rows), sqrt(d) scaling, dropout, encoder, seq-to-seq BCE."""

    def __init__(self, num_items, args):
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 2, args.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(args.max_len + 100, args.hidden)
        self.drop = nn.Dropout(args.dropout)
        self.encoder = Encoder(args)
        xavier_init(self)

    def log2feats(self, seq, positions):
        x = self.item_emb(seq) * self.item_emb.embedding_dim**0.5 + self.pos_emb(positions)
        return self.encoder(self.drop(x), seq)

    def forward(self, seq, pos, neg, positions):
        h = self.log2feats(seq, positions)
        return bce((h * self.item_emb(pos)).sum(-1), (h * self.item_emb(neg)).sum(-1), pos)

    def predict(self, seq, positions, item_indices):
        u = self.log2feats(seq, positions)[:, -1, :]
        return self.item_emb(item_indices).matmul(u.unsqueeze(-1)).squeeze(-1)


class CrossAttention(nn.Module):
    """Official `Multi_CrossAttention`: bias-free Q, K, V, padding keys set to
    -1e9 before the 1/sqrt(d_head) scaling, output Linear; no residual, no norm."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads, self.w = heads, d // heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out = nn.Linear(d, d)

    def forward(self, x, y, ids):
        b, l, _ = x.shape
        split = lambda t: t.view(b, -1, self.heads, self.w).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(y)), split(self.v(y))
        mask = (ids == 0).unsqueeze(1).repeat(1, l, 1).unsqueeze(1)
        s = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(mask, -1e9)
        a = torch.matmul(torch.softmax(s / math.sqrt(self.w), dim=-1), v)
        return self.out(a.transpose(1, 2).contiguous().view(b, -1, self.heads * self.w))


class LLMESR(nn.Module):
    """Official `LLMESR_SASRec` (`DualLLMSASRec` + self-distillation)."""

    def __init__(self, llm_table, args):
        super().__init__()
        d, big = args.hidden, llm_table.shape[1]
        pad = np.zeros((1, big), dtype=np.float32)
        llm = np.concatenate([pad, llm_table, pad]).astype(np.float32)
        self.llm_item_emb = nn.Embedding.from_pretrained(torch.from_numpy(llm), freeze=True)
        self.adapter = nn.Sequential(nn.Linear(big, big // 2), nn.Linear(big // 2, d))
        self.id_item_emb = nn.Embedding.from_pretrained(torch.from_numpy(pca_table(llm_table, d)), freeze=False)
        self.pos_emb = nn.Embedding(args.max_len + 100, d)
        self.drop = nn.Dropout(args.dropout)
        self.llm2id, self.id2llm = CrossAttention(d), CrossAttention(d)
        self.encoder = Encoder(args)
        self.alpha = args.alpha
        xavier_init(self, skip=("llm_item_emb", "id_item_emb"))

    def item_vectors(self, ids):
        """Official `_get_embedding`: the adapter at every requested position."""
        return torch.cat([self.id_item_emb(ids), self.adapter(self.llm_item_emb(ids))], dim=-1)

    def log2feats(self, seq, positions):
        scale, p = self.id_item_emb.embedding_dim**0.5, self.pos_emb(positions)
        co = self.drop(self.id_item_emb(seq) * scale + p)
        se = self.drop(self.adapter(self.llm_item_emb(seq)) * scale + p)
        co, se = self.llm2id(se, co, seq), self.id2llm(co, se, seq)
        return torch.cat([self.encoder(co, seq), self.encoder(se, seq)], dim=-1)

    def forward(self, seq, pos, neg, positions, sim_seq, sim_positions):
        h = self.log2feats(seq, positions)
        rank = bce((h * self.item_vectors(pos)).sum(-1), (h * self.item_vectors(neg)).sum(-1), pos)
        student = self.log2feats(seq, positions)[:, -1, :]
        teachers = self.log2feats(sim_seq, sim_positions)[:, -1, :].detach()
        teacher = teachers.view(seq.shape[0], -1, teachers.shape[-1]).mean(dim=1)
        return rank + self.alpha * F.mse_loss(student, teacher)


def pca_table(x, k):
    """`(items + 2, k)`: padding row, the PCA of `x` to k columns, mask row."""
    xc = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(xc[: min(len(xc), 4096)], full_matrices=False)
    z = (xc @ vt[:k].T).astype(np.float32)
    pad = np.zeros((1, k), dtype=np.float32)
    return np.concatenate([pad, z, pad])


# ---------------------------------------------------------------- timing


def timed(reps, warmup, work):
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        work(i)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def train_steps(model, batches, args):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0)

    def step(i):
        loss = model(**batches[i])
        loss.backward()
        opt.step()
        opt.zero_grad()

    return timed(args.steps, args.warmup, step)


def eval_passes(model, batches, args):
    model.eval()

    def one_pass(_):
        with torch.no_grad():
            for b in batches:
                torch.argsort(torch.argsort(-model.predict(**b)))[:, 0]

    return timed(args.steps, args.warmup, one_pass)


def embed_passes(args):
    from sentence_transformers import SentenceTransformer

    with open(args.prompts) as f:
        prompts = [json.loads(line) for line in f if line.strip()]
    model = SentenceTransformer(args.model, device="cpu", local_files_only=True)
    times = timed(args.steps, args.warmup, lambda _: model.encode(prompts, batch_size=args.embed_batch, normalize_embeddings=True))
    return times, {"texts": len(prompts), "max_seq_length": model.max_seq_length, "embed_batch": args.embed_batch}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    info = {"what": args.what, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.what == "embed":
        times, extra = embed_passes(args)
        info.update(extra)
    else:
        seqs = read_sequences(args.data)
        num_items = max(max(s) for s in seqs)
        info.update(users=len(seqs), items=num_items, max_len=args.max_len)
        if args.what == "eval":
            model = SASRec(num_items, args)
            batches = eval_batches(seqs, num_items, args)
            times = eval_passes(model, batches, args)
        else:
            if args.what == "llmesr":
                llm = np.load(args.item_emb).astype(np.float32)
                assert llm.shape[0] == num_items, f"{args.item_emb}: {llm.shape[0]} rows, {num_items} items"
                model = LLMESR(llm, args)
                info["llm_dim"] = llm.shape[1]
            else:
                model = SASRec(num_items, args)
            batches = training_batches(seqs, num_items, args, args.warmup + args.steps)
            times = train_steps(model, batches, args)
            info.update(batch=args.batch, steps_per_epoch=math.ceil(len(seqs) / args.batch))
    times_sorted = sorted(times)
    info.update(
        median_ms=times_sorted[len(times) // 2],
        times_ms=times,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
