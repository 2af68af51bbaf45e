"""The layer contract and the core-only install.

- ``lede_env`` imports nothing from ``agents`` and no RL / dataset / sweep / plotting library,
  and its own modules keep to their floors (import-linter, contracts in ``pyproject.toml``);
  inside ``lede_env`` imports go one way (no cycles) and sit at the top of each module;
- decoding with an exported agent works with those libraries absent (they are blocked from
  import in a subprocess);
- a command whose extra is missing says which extra to install, in one line;
- importing the CLI with d3rlpy prints no 'Gym has been unmaintained' banner;
- the modules of ``agents`` import one another one way only (no import cycle).
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ["d3rlpy", "stable_baselines3", "sb3_contrib", "minari", "wandb", "sweeps", "matplotlib", "h5py"]


def test_layer_contract_is_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_imports_inside_lede_env_go_one_way():
    """No module of ``lede_env`` imports, directly or through others, a module that imports it
    (imports inside functions count, type-checking ones do not): the floors of the layers
    contract (``pyproject.toml``) hold between modules of one floor too."""
    import grimp

    g = grimp.build_graph("lede_env", exclude_type_checking_imports=True)
    cycles = []
    for a in sorted(g.modules):
        for b in sorted(g.find_modules_directly_imported_by(a)):
            if b != "lede_env" and a != "lede_env" and g.find_shortest_chain(importer=b, imported=a) is not None:
                cycles.append(f"{a} -> {b} -> ... -> {a}")
    assert not cycles, cycles


def test_lede_env_imports_its_own_modules_at_the_top():
    """Every import of one ``lede_env`` module by another is at module level (no cycle to dodge);
    imports inside functions are left to optional dependencies."""
    inside = []
    for path in sorted((ROOT / "lede_env").glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{path.name}:{n.lineno}" for n in ast.walk(fn)
                           if isinstance(n, ast.ImportFrom) and (n.level > 0 or (n.module or "").startswith("lede_env"))]
    assert not inside, inside


def test_decoding_with_an_exported_agent_needs_only_core_dependencies(tmp_path):
    code = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys

        for name in {BLOCKED!r}:
            sys.modules[name] = None   # `import name` now fails, find_spec(name) says "not installed"
        import torch
        import lede_env
        for m in pkgutil.iter_modules(lede_env.__path__):
            importlib.import_module("lede_env." + m.name)   # every module of the core imports

        from transformers import LlamaConfig, LlamaForCausalLM
        from lede_env.decoding import SelfSpeculativeDecoder, greedy_reference
        from lede_env.exits import ExitHeads
        from lede_env.layers import LayerStack
        from lede_env.policies import ExportedPolicy

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg).eval()
        stack = LayerStack(model)
        heads = ExitHeads(stack, (1, 2), "lens")
        dec = SelfSpeculativeDecoder(stack, heads, k_max=3)
        layout = dec.observer.layout()
        n_actions = dec.actions.n

        class Q(torch.nn.Module):      # a stand-in greedy Q-policy: always the action (exit 2, K=3)
            def __init__(self, a: int):
                super().__init__()
                self.a = a

            def forward(self, x):
                return torch.full((x.shape[0],), self.a, dtype=torch.long)

        folder = "{tmp_path}"
        torch.jit.script(Q(n_actions - 1)).save(folder + "/policy.pt")
        cfg_json = dict(format=1, exit_layers=[1, 2], k_max=3, bonus=True,
                        observation=dict(hidden_dim=dec.observer.config.hidden_dim,
                                         history=dec.observer.config.history,
                                         recent_tokens=dec.observer.config.recent_tokens,
                                         seed=dec.observer.config.seed),
                        observation_layout=layout)
        open(folder + "/policy.json", "w").write(json.dumps(cfg_json))
        pol = ExportedPolicy(folder)
        pol.check_compatible(dec.observer, dec.actions)
        ids = torch.tensor([1, 5, 9, 2])
        res = dec.generate(ids, pol, 12)
        assert res.tokens == greedy_reference(model, ids, 12, ()), (res.tokens,)
        assert all(r.exit_layer == 2 for r in res.rounds[:-1]), [r.exit_layer for r in res.rounds]
        for name in {BLOCKED!r}:
            assert sys.modules[name] is None, name
        print("OK")
    """)
    script = tmp_path / "core_only.py"  # a file: TorchScript compiles from source
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_missing_extra_names_the_install_command():
    from agents.cli import missing_extra

    msg = missing_extra(ModuleNotFoundError("No module named 'd3rlpy'", name="d3rlpy"))
    assert "pip install 'lede[rl]'" in msg
    assert "pip install 'lede[report]'" in missing_extra(ModuleNotFoundError("x", name="matplotlib.pyplot"))
    assert missing_extra(ModuleNotFoundError("x", name="not_an_extra")) is None


def agents_imports() -> dict[str, set[str]]:
    """``{module: the agents modules it imports}`` over ``agents/*.py``, read from this checkout's
    files (every import statement, those inside functions too), not from what ``agents`` resolves
    to in this process."""
    mods = {p.stem for p in (ROOT / "agents").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for m in sorted(mods):
        found = set()
        for node in ast.walk(ast.parse((ROOT / "agents" / f"{m}.py").read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("agents.")}
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                if base in (".", "agents"):
                    found |= {a.name for a in node.names}
                elif base.startswith((".", "agents.")):
                    found.add(base.lstrip(".").removeprefix("agents.").split(".")[0])
        graph[m] = found & mods - {m}
    return graph


def test_agents_modules_import_one_another_one_way_only():
    graph = agents_imports()

    def chain(a: str, b: str) -> list[str]:
        """The shortest import chain from ``a`` to ``b`` (empty: there is none)."""
        prev, todo = {a: a}, [a]
        for m in todo:
            for n in sorted(graph[m] - prev.keys()):
                prev[n] = m
                todo.append(n)
        out = [b] if b in prev else []
        while out and out[-1] != a:
            out.append(prev[out[-1]])
        return out[::-1]

    assert sum(map(len, graph.values())) > 20, graph  # the walk found the imports
    cycles = [" -> ".join(f"agents.{m}" for m in [a] + back)
              for a in sorted(graph) for b in sorted(graph[a]) if (back := chain(b, a))]
    assert not cycles, "\n".join(cycles)


def test_lede_commands_print_no_gym_banner():
    """d3rlpy imports the old gym package, whose import prints an 'unmaintained' banner; the
    CLI silences that notice (and only it) before anything imports gym."""
    pytest.importorskip("d3rlpy")
    code = "import agents.cli, d3rlpy, gym, sys; sys.stderr.write('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                           "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0 and res.stderr.endswith("ok"), res.stderr
    assert "unmaintained" not in res.stderr

