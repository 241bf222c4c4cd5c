"""Hugging Face configuration of an exported unmask model. Imports only transformers: the export copies this
file into the model folder, where `AutoConfig.from_pretrained(dir, trust_remote_code=True)` loads it.

Field names are unmask's own ModelConfig names (dim, n_layers, ...), so the core backbones read either config;
`attribute_map` gives the usual Hugging Face aliases (hidden_size, num_hidden_layers, ...) for generic tools.
"""

from transformers import PretrainedConfig


class UnmaskConfig(PretrainedConfig):
    model_type = "unmask"
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim",
                     "max_position_embeddings": "max_seq_len"}

    def __init__(self, arch="unmask", dim=256, n_layers=4, n_heads=4, n_kv_heads=None, ffn_dim=768, vocab_size=4096,
                 max_seq_len=1024, rope_theta=10000.0, norm_eps=1e-5, time_conditioning=False, cond_dim=128,
                 init_std=0.02, causal=False, tie_word_embeddings=False, mask_token_id=4, noise_schedule="loglinear",
                 sampler=None, block_size=0, qkv_bias=False, shift_logits=False, diffusion_process="masked",
                 **kwargs):
        self.arch, self.dim, self.n_layers, self.n_heads = arch, dim, n_layers, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.ffn_dim, self.vocab_size, self.max_seq_len = ffn_dim, vocab_size, max_seq_len
        self.rope_theta, self.norm_eps, self.init_std = rope_theta, norm_eps, init_std
        self.time_conditioning, self.cond_dim = time_conditioning, cond_dim
        self.qkv_bias = qkv_bias  # q/k/v projection biases (a Qwen2 import)
        self.shift_logits = shift_logits  # an adapted causal LM: position i's logits come from hidden state i-1
        self.causal = causal  # the autoregressive baseline's attention; masked diffusion is bidirectional
        self.block_size = block_size  # block diffusion (BD3-LM): attention causal across blocks of this size; 0: none
        self.mask_token_id = mask_token_id
        self.noise_schedule = noise_schedule  # alpha(t) used by the samplers: loglinear or cosine
        # the diffusion the model was trained on, which its samplers follow: "masked" (absorbing <mask>; exports
        # without the key) or "uniform" (uniform-state, Duo: diffusion.objective = "duo")
        self.diffusion_process = diffusion_process
        self.sampler = dict(sampler or {})  # default arguments of diffusion_generate (generation defaults)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads

    @property
    def tie_embeddings(self) -> bool:  # unmask's name, read by the core backbones
        return self.tie_word_embeddings
