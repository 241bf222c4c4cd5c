"""Loading exported folders the way a user without unmask does: a fresh, isolated interpreter (`python -I`, cwd
outside the repo) in which importing unmask fails, so the folder must need only torch + transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# One job per folder: {"folder", "tokens" [B, L], "t" ([B] or None), "templates", "options", "texts" (optional)}.
FRESH = textwrap.dedent("""
    import sys, torch
    class NoUnmask:  # the venv may hold an editable unmask install, which -I does not hide
        def find_spec(self, name, path=None, target=None):
            if name == "unmask" or name.startswith("unmask."):
                raise ImportError("the exported folder imported unmask")
    sys.meta_path.insert(0, NoUnmask())
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
    results = []
    for job in torch.load(sys.argv[1]):
        folder = job["folder"]
        model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            out = {"logits": model(job["tokens"], t=job["t"]).logits,
                   "hidden": base(job["tokens"], t=job["t"]).last_hidden_state,
                   "samples": [[model.diffusion_generate(template=tpl, **o) for tpl in job["templates"]]
                               for o in job["options"]],
                   "config": type(model.config).__name__, "base": type(base).__name__}
        if job.get("texts"):
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
            out["ids"] = [tok.encode(t) for t in job["texts"]]
        results.append(out)
    assert not any(m == "unmask" or m.startswith("unmask.") for m in sys.modules)
    torch.save(results, sys.argv[2])
""")


def run_fresh(jobs: list[dict], work: Path) -> list[dict]:
    """Run the jobs in a fresh interpreter (cwd `work`, outside the repo); one result dict per job."""
    torch.save(jobs, work / "jobs.pt")
    # A private module cache: transformers copies remote code there by folder name, which other runs share.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(work / "modules")}
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH, str(work / "jobs.pt"), str(work / "results.pt")],
                          env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(work / "results.pt")
