"""Hugging Face modeling of an exported unmask masked-diffusion model. Imports only torch, transformers and its
sibling files (copied with it), so `AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)` works
without unmask installed.

A thin wrapper, no second copy of the math: `self.model` IS unmask's backbone (transformer.Transformer, or
bert_blocks.BertTransformer for arch "bert"), so the weight keys are `model.` + unmask's own keys and the logits
are unmask's. `UnmaskForMaskedLM.diffusion_generate` runs unmask's sampling loop (sampling.py): same tokens for
the same seed. The `<mask>` logit is left as the network computes it; the samplers (and unmask's loss) suppress it.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .bert_blocks import BertTransformer
from .configuration_unmask import UnmaskConfig
from .sampling import SamplerOptions, generate
from .schedule import get_schedule
from .transformer import RMSNorm, Transformer


class UnmaskPreTrainedModel(PreTrainedModel):
    """Both exported classes hold the whole backbone (output layer included) under `model`, so every class loads
    every folder without key renaming."""

    config_class = UnmaskConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block", "BertBlock"]
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        if config.arch == "bert":
            self.model = BertTransformer(config, causal=config.causal)
        else:
            self.model = Transformer(config, causal=config.causal, block_size=getattr(config, "block_size", 0))
        self.post_init()

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

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value):
        self.model.output = value


def refuse_padding(attention_mask):
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("unmask models attend to every position (they are trained that way): pass no "
                         "attention_mask, or one of all ones")


class UnmaskModel(UnmaskPreTrainedModel):
    """Hidden states [B, L, D] before the vocabulary projection: after the final norm (arch unmask), before the
    MLM transform (arch bert)."""

    def forward(self, input_ids, t=None, attention_mask=None, return_dict=None, **kwargs):
        refuse_padding(attention_mask)
        m = self.model
        h, cond = m.embed(input_ids, t)
        if self.config.arch == "bert":
            for layer in m.layers:
                h = layer(h)
            return BaseModelOutput(last_hidden_state=h)
        cos, sin, mask = m.layout(input_ids.shape[1], h.device)
        for layer in m.layers:
            h = layer(h, cos, sin, cond, mask=mask)
        return BaseModelOutput(last_hidden_state=m.norm(h))


class UnmaskForMaskedLM(UnmaskPreTrainedModel):
    """Logits [B, L, V] of x0 for every position; `diffusion_generate` samples."""

    def forward(self, input_ids, t=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        refuse_padding(attention_mask)
        logits = self.model(input_ids, t)
        loss = None
        if labels is not None:  # plain MLM cross-entropy on labelled positions (-100: ignored)
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)

    def special_ids(self):
        c = self.config
        return {"mask": c.mask_token_id, "eos": c.eos_token_id, "pad": c.pad_token_id, "bos": c.bos_token_id}

    @torch.no_grad()
    def diffusion_generate(self, input_ids=None, max_length=None, template=None, prompt_mask=None, **options):
        """Fill `<mask>` positions with unmask's samplers. Either `template` [B, L] (`<mask>` where text is
        generated: continuation, infilling, unconditional), or `input_ids` [B, P] (a prompt, e.g. with <bos>)
        followed by masks up to `max_length`. Options (defaults: config.sampler, then unmask's): kind
        (ancestral|remask|threshold, or ar for a causal export), steps, block_length, remasking
        (low_confidence|random), threshold, kv_cache (none|prefix|dual), cache_refresh, temperature, top_k, top_p,
        guidance, cache, stop_at_eos, seed, and for a uniform-state export (config.diffusion_process "uniform", whose
        <mask> positions start as uniform tokens) noise_removal (greedy|ancestral). Returns {"sequences", "lengths",
        "nfe", "steps"}."""
        c = self.config
        if template is None:
            if input_ids is None or max_length is None or max_length <= input_ids.shape[1]:
                raise ValueError("pass template=[B, L] with <mask> positions, or input_ids and a max_length "
                                 "longer than them")
            masks = input_ids.new_full((input_ids.shape[0], max_length - input_ids.shape[1]), c.mask_token_id)
            template = torch.cat([input_ids, masks], dim=1)
        self.eval()
        tokens, lengths, nfe, steps = generate(
            self.model, template.to(self.device), SamplerOptions(**{**c.sampler, **options}), c.mask_token_id,
            c.eos_token_id, c.pad_token_id, get_schedule(c.noise_schedule), c.time_conditioning, prompt_mask,
            c.max_seq_len, getattr(c, "diffusion_process", "masked"))
        return {"sequences": tokens, "lengths": lengths, "nfe": nfe, "steps": steps}

    @torch.no_grad()
    def chat(self, tokenizer, messages, max_length=None, **options):
        """The answer (text) to `messages` ([{"role": "system"|"user"|"assistant", "content": ...}], ending with the
        user's turn) of an instruction-tuned export: the folder's chat template (tokenizer_config.json) renders the
        prompt, encoded as in training (<bos>, then the text after it), masks follow up to `max_length` (default
        max_seq_len), and the answer is what comes before the first generated <eos>. Options: diffusion_generate's."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: the model was not instruction-tuned (exports of "
                             "runs on `prepare-data --format chat` shards carry one)")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # a tokenizer without a bos token (Qwen2) has no bos text to drop: unmask's <bos> id is then its eos
        prompt = [self.config.bos_token_id] + tokenizer.encode(text.removeprefix(tokenizer.bos_token or ""),
                                                               add_special_tokens=False)
        out = self.diffusion_generate(input_ids=torch.tensor([prompt], device=self.device),
                                      max_length=max_length or self.config.max_seq_len,
                                      **{**options, "stop_at_eos": True})
        return tokenizer.decode(out["sequences"][0, len(prompt):int(out["lengths"][0])].tolist(),
                                skip_special_tokens=True)
