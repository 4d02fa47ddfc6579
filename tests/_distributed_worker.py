"""The prunes tests/test_distributed.py runs in one process and in a 2-rank gloo group (forked children that join
through torchrun's environment variables, as `torchrun --nproc-per-node 2` sets them)."""
import copy
import json
import os
import signal
import socket
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import calib, tiny_model

WINDOWS, SEQLEN = 10, 16   # 5 batches of 2: 3 + 2 per rank by default, 4 + 1 with COMPRUNE_RANK_SHARES=4,1
PROBE = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))

SCENARIOS = {
    # COMP with its layer stage (block influence) and query heads, token-weighted least squares (the default)
    "comp": dict(ratio=0.3, layer_share=0.25, head_share=0.2),
    "comp-search": dict(ratio=0.25, width_allocation="search", search_nsamples=4, search_levels=4,
                        search_generations=2, search_offspring=3, search_survivors=2, search_filter=2),
    "wanda-sp": dict(method="wanda-sp", ratio=0.2),
    "flap": dict(method="flap", ratio=0.2),
    "llm-pruner": dict(method="llm-pruner", ratio=0.2, taylor_nsamples=5, taylor_seqlen=16),
    "layer-drop": dict(method="layer-drop", ratio=0.25),
}


def model():
    return tiny_model("llama", layers=4, hidden=32, inter=64, heads=4, kv_heads=2)


def run(name: str, ckpt=None, resume=False) -> dict:
    """One scenario's prune: the decisions and the pruned model's logits on a fixed probe."""
    from comprune import PruneConfig, prune
    cfg = PruneConfig(batch_size=2, nsamples=WINDOWS, seqlen=SEQLEN, **SCENARIOS[name])
    windows = WINDOWS + cfg.heldout_windows  # the search holds its fitness windows apart
    pruned, rep = prune(copy.deepcopy(MODEL), None, cfg, calibration=calib(windows, SEQLEN), progress=False,
                        checkpoint_dir=ckpt, resume=resume)
    with torch.no_grad():
        logits = pruned(input_ids=PROBE).logits.float()
    blocks = {str(i): {k: rec.get(k) for k in ("kept_neurons", "kept_kv_heads", "kept_query_heads")}
              for i, rec in rep.blocks.items()}
    return {"removed_layers": rep.removed_layers, "blocks": blocks, "logits": logits,
            "distributed": rep.distributed}


MODEL = model()


def save(result: dict, path: Path):
    save_file({"logits": result["logits"].contiguous()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({k: v for k, v in result.items() if k != "logits"}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group(names, out: Path, world: int = 2, env: dict | None = None, ckpt=None, resume=False) -> list[int]:
    """Fork `world` ranks that each run `names` and save their results as out/<rank>-<name>.*; returns their exit
    codes. When one rank dies the others are killed, as torchrun's agent does."""
    out.mkdir(parents=True, exist_ok=True)

    def body():
        for name in names:
            save(run(name, ckpt=ckpt, resume=resume), out / f"{os.environ['RANK']}-{name}")
        return 0
    return ranks(body, world, env)


def cli(argv, world: int = 2) -> list[int]:
    """`torchrun --nproc-per-node <world> -m comprune.cli <argv>` without the agent: forked ranks with the
    environment torchrun gives them (world=1: one plain process)."""
    def body():
        from comprune.cli import main
        return main([str(a) for a in argv])
    return ranks(body, world) if world > 1 else ranks(body, 1, rendezvous=False)


def ranks(body, world: int, env: dict | None = None, rendezvous: bool = True, timeout: float = 240) -> list[int]:
    """Fork `world` processes that run body() as ranks 0..world-1 of a group (torchrun's environment variables,
    one thread each) and leave the group; their exit codes."""
    from _forking import fork
    port = free_port()

    def rank_body(rank):
        import torch.distributed as dist
        if rendezvous:
            os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        os.environ.update(env or {})
        torch.set_num_threads(1)
        code = body()
        if dist.is_initialized():
            dist.destroy_process_group()
        return code

    pids = [fork(lambda r=r: rank_body(r)) for r in range(world)]
    codes, deadline = {}, time.monotonic() + timeout
    while len(codes) < world:
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if any(c != 0 for c in codes.values()) or time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return [codes[p] for p in pids]


def load(path: Path) -> dict:
    from safetensors.torch import load_file
    res = json.loads(path.with_suffix(".json").read_text())
    res["logits"] = load_file(str(path.with_suffix(".safetensors")))["logits"]
    return res
