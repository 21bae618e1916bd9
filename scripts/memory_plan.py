"""Per-GPU training memory of Qwen3-VL 2B / 4B / 8B under DDP, FSDP2 and DeepSpeed ZeRO-3 (docs/SCALING.md).

    python scripts/memory_plan.py [--gpus 8] [--tokens 8192]

Prints the markdown table of docs/SCALING.md. Every number is computed from the architecture
(parameter counts from the published configs' dimensions, not hard-coded totals) with the
formulas below; bytes are per GPU, GiB = 2**30 bytes.

Model state (AdamW, mixed precision bf16; trainable P_t of P parameters; N GPUs):
- DDP: bf16 weights 2P, bf16 grads 2P_t, bf16 Adam moments 4P_t (torch AdamW keeps them in the
  parameter dtype; the configs load ``model.dtype: bfloat16``), DDP gradient buckets 2P_t.
- FSDP2 (accelerate upcasts trainable parameters to fp32 masters): (4 + 4 + 8) P_t / N for fp32
  weights, grads and Adam moments, 2 (P - P_t) / N for frozen bf16 weights, plus the unsharded
  working set: the root unit in bf16 for the whole step (embedding table, LM head when untied,
  final norm, vision merger / patch embedding) and two decoder layers' bf16 weights + grads in flight.
- ZeRO-3: the same 16 P_t / N + 2 (P - P_t) / N (bf16 weights + grads, fp32 master + moments) and
  the same working set (the LM head is gathered for the whole wrapped forward).

Activations (bf16, T tokens per micro-batch, per decoder layer and token, elements):
  6 H (norm inputs / outputs, residuals) + 4 q_dim (q, roped q, attention output, o_proj input)
  + 4 kv_dim (k, v, roped k, attention saves) + 4 I (gate, up, act, act * up)
- without gradient checkpointing: L layers of that;
- with it: the L layer inputs (T H each) + one layer recomputed in backward.
Loss head: one [chunk = 2048, V] fp32 projection and its gradient (losses recompute chunks).
Channel-A runs ``n_softctx_iter`` forwards whose activations all live until backward: multiply
the activation column by N (2 in the shipped configs; an upper bound, since with
``stage2_ab.prefix_reuse`` forwards 2..N hold activations only for the suffix tokens). Not counted: the vision tower's
activations (they scale with image patches, not text tokens; frozen in the 8B configs), the
CUDA context and allocator fragmentation (budget 1-3 GiB).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30
CE_CHUNK = 2048


@dataclass(frozen=True)
class Dims:
    """Text decoder + vision tower dimensions of one Qwen3-VL size (from its config.json)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    freeze_vision: bool  # as in the shipped configs (8B freezes the vision tower)

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 2 * self.head_dim + 3 * h * self.intermediate + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def vision_block_params(self) -> int:
        hv, iv = self.vision_hidden, self.vision_intermediate
        return 4 * hv * hv + 4 * hv + 2 * hv * iv + hv + iv + 4 * hv

    @property
    def vision_other_params(self) -> int:
        """Patch embedding (3 x 2 x 16 x 16), 2304 position embeddings, merger + 3 deepstack mergers."""
        hv, m = self.vision_hidden, self.vision_hidden * 4
        merger = m * m + m + m * self.hidden + self.hidden + 2 * m
        return 3 * 2 * 16 * 16 * hv + hv + 2304 * hv + 4 * merger

    @property
    def vision_params(self) -> int:
        return self.vision_depth * self.vision_block_params + self.vision_other_params

    @property
    def params(self) -> int:
        return self.embedding_params + self.layers * self.layer_params + self.hidden + self.vision_params

    @property
    def trainable(self) -> int:
        return self.params - (self.vision_params if self.freeze_vision else 0)

    @property
    def root_params(self) -> int:
        """What stays in FSDP2's root unit (gathered for the whole step)."""
        return self.embedding_params + self.hidden + self.vision_other_params


MODELS = (
    Dims("Qwen3-VL-2B", 151936, 2048, 28, 16, 8, 128, 6144, True, 24, 1024, 4096, False),
    Dims("Qwen3-VL-4B", 151936, 2560, 36, 32, 8, 128, 9728, True, 24, 1024, 4096, False),
    Dims("Qwen3-VL-8B", 151936, 4096, 36, 32, 8, 128, 12288, False, 27, 1152, 4304, True),
)
ENGINES = ("DDP", "FSDP2", "ZeRO-3")


def model_state_bytes(d: Dims, engine: str, gpus: int) -> float:
    p, pt = d.params, d.trainable
    if engine == "DDP":
        return 2 * p + 2 * pt + 4 * pt + 2 * pt
    if engine not in ("FSDP2", "ZeRO-3"):
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    sharded = (16 * pt + 2 * (p - pt)) / gpus
    working = 2 * d.root_params + 2 * (2 + 2) * d.layer_params
    return sharded + working


def activation_bytes(d: Dims, tokens: int, checkpointing: bool) -> float:
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    per_token_layer = 6 * d.hidden + 4 * q + 4 * kv + 4 * d.intermediate
    layer = 2 * tokens * per_token_layer
    stored = d.layers * 2 * tokens * d.hidden + layer if checkpointing else d.layers * layer
    head = 2 * CE_CHUNK * d.vocab * 4
    return stored + head


def table(gpus: int = 8, tokens: int = 8192) -> str:
    lines = [
        "| model | params (trainable) | engine | model state / GPU | + activations, checkpointing on | + activations, off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in MODELS:
        for engine in ENGINES:
            state = model_state_bytes(d, engine, gpus)
            on, off = (state + activation_bytes(d, tokens, c) for c in (True, False))
            lines.append(
                f"| {d.name} | {d.params / 1e9:.2f}B ({d.trainable / 1e9:.2f}B) | {engine} | {state / GIB:.1f} GiB "
                f"| {on / GIB:.1f} GiB | {off / GIB:.1f} GiB |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs sharing the model state")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (training.max_length x batch_size)")
    args = parser.parse_args(argv)
    print(table(args.gpus, args.tokens))


if __name__ == "__main__":
    main()
