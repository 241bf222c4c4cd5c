"""Hugging Face modeling of an exported unmask masked-diffusion model. Imports only torch and transformers (and
its sibling files, copied with it), so `AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)`
works without unmask installed.

The math is unmask's, operation for operation (logits equal unmask.model.transformer.Transformer's):
- arch "unmask": pre-norm RMSNorm blocks without biases, rotary positions (GPT-NeoX half-split layout), SwiGLU,
  grouped-query attention, optional adaLN-zero time conditioning, optional tied embeddings;
- arch "bert": the post-LN BERT/RoBERTa encoder of an imported masked LM (bert_blocks.py, shared with unmask).
`UnmaskForMaskedLM.diffusion_generate` runs unmask's samplers (sampling_unmask.py): same tokens for the same
seed. The `<mask>` logit is left as the network computes it; the samplers (and unmask's loss) suppress it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .bert_blocks import BertBlock, BertHead, embed
from .configuration_unmask import UnmaskConfig
from .sampling_unmask import sample


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(head_dim, length, theta, device):
    """cos/sin [length, head_dim/2] in fp32, rows equal to unmask's precomputed tables."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.causal = cfg.head_dim, cfg.causal
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.adaln = nn.Linear(cfg.cond_dim, 6 * cfg.dim) if cfg.time_conditioning else None

    def forward(self, x, cos, sin, cond=None):
        if self.adaln is None:
            x = x + self.attention(self.attention_norm(x), cos, sin)
            return x + self.feed_forward(self.ffn_norm(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)
        h = self.attention_norm(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attention(h, cos, sin)
        h = self.ffn_norm(x) * (1 + scale2) + shift2
        return x + gate2 * self.feed_forward(h)


class TimeEmbedding(nn.Module):
    def __init__(self, cond_dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class UnmaskPreTrainedModel(PreTrainedModel):
    config_class = UnmaskConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block", "BertBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        # Only for weights a folder lacks; exported folders hold every weight.
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(std=std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class UnmaskModel(UnmaskPreTrainedModel):
    """The backbone: tokens [B, L] (, t [B]) -> hidden states [B, L, D] (after the final norm for arch unmask)."""

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        if c.arch == "bert":
            self.pos_embeddings = nn.Embedding(c.max_seq_len, c.dim)
            self.emb_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
            self.layers = nn.ModuleList(BertBlock(c, c.causal) for _ in range(c.n_layers))
        else:
            self.time_embedding = TimeEmbedding(c.cond_dim) if c.time_conditioning else None
            self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
            self.norm = RMSNorm(c.dim, c.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids, t=None, attention_mask=None, return_dict=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("unmask models attend to every position (they are trained that way): pass no "
                             "attention_mask, or one of all ones")
        if self.config.arch == "bert":
            h = embed(self.tok_embeddings, self.pos_embeddings, self.emb_norm, input_ids)
            for layer in self.layers:
                h = layer(h)
            return BaseModelOutput(last_hidden_state=h)
        L = input_ids.shape[1]
        if L > self.config.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len {self.config.max_seq_len}")
        cond = None
        if self.time_embedding is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t ([batch] in [0, 1])")
            cond = F.silu(self.time_embedding(t))
        h = self.tok_embeddings(input_ids)
        cos, sin = rotary_tables(self.config.head_dim, L, self.config.rope_theta, input_ids.device)
        for layer in self.layers:
            h = layer(h, cos, sin, cond)
        return BaseModelOutput(last_hidden_state=self.norm(h))


class UnmaskForMaskedLM(UnmaskPreTrainedModel):
    """Backbone + vocabulary head: logits [B, L, V] of x0 for every position; `diffusion_generate` samples."""

    _tied_weights_keys = {"lm_head.weight": "model.tok_embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = UnmaskModel(config)
        bert = config.arch == "bert"
        self.head = BertHead(config) if bert else None
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=bert)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids, t=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        h = self.model(input_ids, t=t, attention_mask=attention_mask).last_hidden_state
        logits = self.lm_head(self.head(h) if self.head is not None else h)
        loss = None
        if labels is not None:  # plain MLM cross-entropy on labelled positions (-100: ignored)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)

    def special_ids(self):
        c = self.config
        return {"mask": c.mask_token_id, "eos": c.eos_token_id, "pad": c.pad_token_id, "bos": c.bos_token_id}

    @torch.no_grad()
    def diffusion_generate(self, input_ids=None, max_length=None, template=None, prompt_mask=None, **options):
        """Fill `<mask>` positions with unmask's samplers. Either `template` [B, L] (`<mask>` where text is
        generated: continuation, infilling, unconditional), or `input_ids` [B, P] (a prompt, e.g. with <bos>)
        followed by masks up to `max_length`. Options (defaults: config.sampler, then unmask's): kind
        (ancestral|remask), steps, block_length, remasking (low_confidence|random), temperature, top_k, top_p,
        guidance, cache, stop_at_eos, seed. Returns {"sequences", "lengths", "nfe", "steps"}."""
        special = self.special_ids()
        if template is None:
            if input_ids is None or max_length is None or max_length <= input_ids.shape[1]:
                raise ValueError("pass template=[B, L] with <mask> positions, or input_ids and a max_length "
                                 "longer than them")
            masks = input_ids.new_full((input_ids.shape[0], max_length - input_ids.shape[1]), special["mask"])
            template = torch.cat([input_ids, masks], dim=1)
        self.eval()

        def network(tokens, t=None):
            return self(tokens, t=t).logits

        tokens, lengths, nfe, steps = sample(
            network, template.to(self.device), special, self.config.noise_schedule, self.config.max_seq_len,
            self.config.time_conditioning, prompt_mask, **{**self.config.sampler, **options})
        return {"sequences": tokens, "lengths": lengths, "nfe": nfe, "steps": steps}
