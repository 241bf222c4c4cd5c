"""Named model sizes (`model.size`). Every test uses `tiny`; `small` is the CPU demo; the rest follow published shapes.

Kept beside unmask/config.py, which expands them, so that config imports no model code (model depends on config)."""

MODEL_SIZES: dict[str, dict] = {
    # ~0.16M parameters: fast enough for every unit and distributed test.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=256),
    # ~20M parameters with an 8k vocabulary: the CPU demo.
    "small": dict(dim=384, n_layers=8, n_heads=6, ffn_dim=1024, vocab_size=8192, max_seq_len=512),
    # GPT-2 small / MDLM shape (12 x 768, 12 heads, tied embeddings), SwiGLU of the same parameter budget.
    "125m": dict(dim=768, n_layers=12, n_heads=12, ffn_dim=2048, vocab_size=50304, max_seq_len=1024,
                 tie_embeddings=True),
    # GPT-2 medium shape.
    "350m": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=2816, vocab_size=50304, max_seq_len=1024,
                 tie_embeddings=True),
    # TinyLlama-like 1B with GQA.
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32000,
               max_seq_len=2048),
    # LLaDA-8B: 32 layers, 4096 wide, 32 heads (no GQA), SwiGLU 12288, vocabulary 126464, 4096 context.
    "8b": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim=12288, vocab_size=126464, max_seq_len=4096,
               rope_theta=500000.0),
}
