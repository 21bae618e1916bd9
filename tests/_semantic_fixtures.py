"""A hand-made sentence-transformers encoder saved locally (no network), loaded through the real
``SentenceTransformer(path)`` path.

A BERT with 0 layers, zero position / token-type embeddings, zero rows for the special tokens and a
LayerNorm of weight 1 and bias 0 maps a one-word desc ``w`` to ``LayerNorm(row_w)`` (the special
tokens give zero vectors), so after mean pooling and L2 normalisation its embedding is
``row_w / |row_w|`` for a zero-mean row: the cosine similarity of two one-word descs is the cosine of
the rows written below, known by hand.
"""

from __future__ import annotations

from pathlib import Path

# Zero-mean rows; cos(cat, kitty) = 2 / (sqrt(2) * 2) = 0.7071; cos(cat, truck) = cos(cat, dog) = 0;
# puppy = dog (cos 1).
ROWS = {
    "cat": (1.0, -1.0, 0.0, 0.0),
    "kitty": (1.0, -1.0, 1.0, -1.0),
    "truck": (0.0, 0.0, 1.0, -1.0),
    "dog": (1.0, 1.0, -1.0, -1.0),
    "puppy": (1.0, 1.0, -1.0, -1.0),
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_hand_encoder(out_dir: Path, rows: dict[str, tuple[float, ...]] = ROWS) -> Path:
    """Save the encoder under ``out_dir/encoder`` (sentence-transformers layout); returns that dir."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizer

    out_dir = Path(out_dir)
    hf_dir, st_dir = out_dir / "hf", out_dir / "encoder"
    hf_dir.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + list(rows)
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(hf_dir / "vocab.txt"), do_lower_case=True)
    dim = len(next(iter(rows.values())))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=0, num_attention_heads=1,
                     intermediate_size=2 * dim, max_position_embeddings=32, type_vocab_size=1)
    bert = BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():
        emb = bert.embeddings
        emb.word_embeddings.weight.zero_()
        for i, word in enumerate(rows, start=len(SPECIAL)):
            emb.word_embeddings.weight[i] = torch.tensor(rows[word])
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        emb.LayerNorm.weight.fill_(1.0)
        emb.LayerNorm.bias.zero_()
    tokenizer.save_pretrained(str(hf_dir))
    bert.save_pretrained(str(hf_dir))
    st = SentenceTransformer(modules=[models.Transformer(str(hf_dir)), models.Pooling(dim, "mean"), models.Normalize()])
    st.save(str(st_dir))
    return st_dir
