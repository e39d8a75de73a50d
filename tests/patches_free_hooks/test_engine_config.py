"""Start-up translation of ``additional_config["helix"]`` into vLLM settings, and its errors.

These run the real ``EngineArgs`` of the installed vLLM against the offline
twins, up to (not including) engine start: every bad layout must be refused
here, with the constraint and a working alternative, before any worker exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from patches_free_hooks import engine_config  # noqa: E402
from patches_free_hooks.compat import HelixStartupError  # noqa: E402
from vllm_helix.config import HelixConfigError  # noqa: E402
from patches_free_hooks.engine_config import apply_helix  # noqa: E402
from vllm_helix.twins import make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _no_core_binding_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")


def _args(model: Path, helix: object, **kwargs: object) -> EngineArgs:
    extra = {} if helix is None else {"helix": helix}
    return EngineArgs(model=str(model), dtype="float32", additional_config=extra, **kwargs)


def test_without_helix_the_arguments_are_untouched(twins: dict[str, Path]) -> None:
    args = _args(twins["llama1"], None, tensor_parallel_size=2)
    assert apply_helix(args) is None
    assert (args.tensor_parallel_size, args.decode_context_parallel_size) == (2, 1)


@pytest.mark.parametrize("spelling", [{"kvp": 2, "tpa": 1}, "kvp=2,tpa=1"])
def test_gqa_layout_becomes_tp_with_dcp_and_block_stripes(twins: dict[str, Path], spelling: object) -> None:
    args = _args(twins["llama1"], spelling)
    resolved = apply_helix(args)
    assert resolved is not None and resolved.stripe == 128  # CPU default block size
    assert args.tensor_parallel_size == 2
    assert args.decode_context_parallel_size == 2
    assert args.cp_kv_cache_interleave_size == 128
    assert args.additional_config["helix"] == {"kvp": 2, "tpa": 1, "tpf": 2, "ep": 1, "hopb": 1, "stripe": 128}


def test_mla_layout_uses_16_token_blocks_and_pins_the_reference_backend(twins: dict[str, Path]) -> None:
    args = _args(twins["deepseek"], {"kvp": 2, "tpa": 1, "hopb": 2, "stripe": 4})
    apply_helix(args)
    assert (args.tensor_parallel_size, args.decode_context_parallel_size, args.cp_kv_cache_interleave_size) == (2, 2, 4)
    assert args.attention_backend.name == "CPU_MLA"  # vLLM would pick AMX_MLA (no LSE) on AMX CPUs


def test_an_explicit_matching_tensor_parallel_size_is_accepted(twins: dict[str, Path]) -> None:
    args = _args(twins["llama2"], {"kvp": 2, "tpa": 2}, tensor_parallel_size=4)
    apply_helix(args)
    assert (args.tensor_parallel_size, args.decode_context_parallel_size) == (4, 2)


@pytest.mark.parametrize(
    ("model", "helix", "kwargs", "message"),
    [
        ("llama1", {"kvp": 2, "tpa": 1}, {"tensor_parallel_size": 4},
         r"kvp\*tpa must equal the number of workers: kvp=2 \* tpa=1 = 2 but --tensor-parallel-size is 4"),
        ("llama2", {"kvp": 1, "tpa": 4}, {}, r"tpa=4 exceeds the model's 2 KV heads"),
        ("deepseek", {"kvp": 1, "tpa": 2}, {}, r"MLA models have one latent KV head, so tpa must be 1"),
        ("llama2", {"kvp": 2, "tpa": 1}, {},
         r"tpa=1 is below the model's 2 KV heads.*use kvp=1,tpa=2|tpa=1 is below the model's 2 KV heads"),
        ("llama1", {"kvp": 2, "tpa": 1, "stripe": 48}, {}, r"stripe=48 must divide the KV block size 128"),
        ("deepseek", {"kvp": 2, "tpa": 1, "stripe": 32}, {}, r"stripe=32 must divide the KV block size 16"),
        ("deepseek", {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 2}, {"enable_expert_parallel": True},
         r"helix ep=2 places the experts itself"),
        ("llama1", {"kvp": 2, "tpa": 1}, {"decode_context_parallel_size": 4}, r"conflicts with helix kvp=2"),
        ("llama1", {"kvp": 2, "tpa": 1}, {"kv_cache_dtype": "fp8"}, r"--kv-cache-dtype fp8 is not supported"),
        ("llama1", {"kvp": 2, "tpa": 1}, {"pipeline_parallel_size": 2}, r"--pipeline-parallel-size"),
        ("llama1", {"kvp": 2, "tpb": 1}, {}, r"unknown helix option\(s\) \['tpb'\]"),
        ("llama1", "kvp=two", {}, r"kvp='two' must be a positive integer in plain decimal digits"),
    ],
)
def test_bad_layouts_fail_before_anything_starts(
    twins: dict[str, Path], model: str, helix: object, kwargs: dict, message: str
) -> None:
    # HelixStartupError (vLLM-side rules) is a HelixConfigError (layout rules)
    with pytest.raises(HelixConfigError, match=message):
        apply_helix(_args(twins[model], helix, **kwargs))


def _transfer(connector: str) -> object:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector=connector, kv_role="kv_consumer")


@pytest.mark.parametrize(
    ("model", "helix", "connector", "message"),
    [
        ("llama1", {"kvp": 2, "tpa": 1}, "NixlConnector",
         r"^--kv-transfer-config NixlConnector with helix kvp=2: vLLM's NIXL transfers support decode-context "
         r"parallelism only for MLA models$"),
        ("llama2", {"kvp": 2, "tpa": 2, "stripe": 16}, "NixlConnector",
         r"only for MLA models; NIXL needs DCP over every worker, i.e. tpa=1 \(got tpa=2\); NIXL moves whole "
         r"blocks, so the stripe must equal the block size 128 \(got stripe=16\); drop stripe$"),
        ("deepseek", {"kvp": 2, "tpa": 1, "stripe": 8}, "NixlConnector",
         r"^--kv-transfer-config NixlConnector with helix kvp=2: NIXL moves whole blocks, so the stripe must "
         r"equal the block size 16 \(got stripe=8\); drop stripe$"),
        ("llama1", {"kvp": 2, "tpa": 1}, "ExampleConnector",
         r"ExampleConnector cannot feed helix kvp=2: .*use \"kv_connector\": \"HelixConnector\" on both servers"),
    ],
)
def test_connectors_that_cannot_feed_a_helix_decode_server_are_refused(
    twins: dict[str, Path], model: str, helix: dict, connector: str, message: str
) -> None:
    with pytest.raises(HelixStartupError, match=message):
        apply_helix(_args(twins[model], helix, kv_transfer_config=_transfer(connector)))


@pytest.mark.parametrize(("model", "helix", "connector"), [
    ("deepseek", {"kvp": 2, "tpa": 1}, "NixlConnector"),  # MLA, tpa 1, stripe = block: vLLM's own rule holds
    ("llama1", {"kvp": 2, "tpa": 1}, "HelixConnector"),
    ("llama1", {"kvp": 1, "tpa": 1}, "ExampleConnector"),  # no KV sharding: vLLM's own caches
])
def test_connectors_that_can_feed_it_pass(twins: dict[str, Path], model: str, helix: dict, connector: str) -> None:
    assert apply_helix(_args(twins[model], helix, kv_transfer_config=_transfer(connector))) is not None


@pytest.mark.parametrize(("extra", "message"), [
    ({"pth": "/tmp/x"}, "unknown HelixConnector option 'pth'.*did you mean 'path'"),
    ({"path": "kv"}, "must be an absolute directory"),
    ({"path": "/"}, "other than /"),
    ({"max_age_s": -1}, "max_age_s=-1"),
    ({"max_bytes": float("nan")}, "max_bytes=nan"),
])
@pytest.mark.parametrize("helix", [None, {"kvp": 2, "tpa": 1}])  # a plain producer is checked like a Helix consumer
def test_bad_helix_connector_options_are_refused_at_start_up_on_every_engine(
        twins: dict[str, Path], extra: dict, message: str, helix: dict | None) -> None:
    from vllm.config import KVTransferConfig

    transfer = KVTransferConfig(kv_connector="HelixConnector", kv_role="kv_producer", kv_connector_extra_config=extra)
    args = _args(twins["llama1"], helix, kv_transfer_config=transfer)
    with pytest.raises(HelixStartupError, match=f"^--kv-transfer-config: .*{message}"):
        engine_config.check_helix_connector(args)


def test_a_store_directory_open_to_other_users_is_refused_with_the_fix(twins: dict[str, Path], tmp_path: Path) -> None:
    from vllm.config import KVTransferConfig

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    transfer = KVTransferConfig(kv_connector="HelixConnector", kv_role="kv_consumer",
                                kv_connector_extra_config={"path": str(shared)})
    with pytest.raises(HelixStartupError, match="open to other users .*chmod 700"):
        engine_config.check_helix_connector(_args(twins["llama1"], None, kv_transfer_config=transfer))
    private = tmp_path / "private" / "kv"
    transfer.kv_connector_extra_config = {"path": str(private)}
    engine_config.check_helix_connector(_args(twins["llama1"], None, kv_transfer_config=transfer))
    assert private.is_dir() and private.stat().st_mode & 0o777 == 0o700


def test_more_workers_than_cores_is_refused(twins: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setattr(engine_config.os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(HelixStartupError, match="2 CPU workers need at least 2 cores but only 1"):
        apply_helix(_args(twins["llama1"], {"kvp": 2, "tpa": 1}))


def test_workers_get_one_core_range_each_when_unbound(twins: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setattr(engine_config.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    apply_helix(_args(twins["llama1"], {"kvp": 2, "tpa": 1}))
    assert engine_config.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"


def test_across_nodes_each_node_counts_its_own_workers_against_its_cores(
        twins: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # kvp=2 over two one-core nodes: one worker per node, bound to the node's whole core range
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setattr(engine_config.os, "sched_getaffinity", lambda pid: {0})
    for rank, headless in ((0, False), (1, True)):
        args = _args(twins["llama1"], {"kvp": 2, "tpa": 1}, nnodes=2, node_rank=rank, master_addr="127.0.0.1")
        assert apply_helix(args, headless=headless) is not None
        assert args.tensor_parallel_size == 2 and engine_config.os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    with pytest.raises(HelixStartupError, match=r"^2 CPU workers on each of 2 nodes need at least 2 cores but only 1"):
        apply_helix(_args(twins["llama2"], {"kvp": 2, "tpa": 2}, nnodes=2), headless=False)


@pytest.mark.parametrize(("helix", "nodes", "rank", "headless", "message"), [
    ({"kvp": 2, "tpa": 1}, 3, 0, False, "with --nnodes 3: 2 workers cannot be split evenly over 3 nodes"),
    ({"kvp": 2, "tpa": 1}, 2, 2, True, "--node-rank 2 is outside 0..1 for --nnodes 2"),
    ({"kvp": 2, "tpa": 1}, 2, 1, False, "--node-rank 1 runs workers only: add --headless"),
    ({"kvp": 2, "tpa": 1}, 2, 0, True, "--node-rank 0 serves the API: drop --headless"),
    ({"kvp": 2, "tpa": 1}, 1, 1, False, "--node-rank 1 needs --nnodes > 1"),
])
def test_inconsistent_node_flags_are_refused_in_one_line(twins: dict[str, Path], helix: dict, nodes: int, rank: int,
                                                         headless: bool, message: str) -> None:
    with pytest.raises(HelixStartupError, match=re.escape(message)) as refused:
        apply_helix(_args(twins["llama1"], helix, nnodes=nodes, node_rank=rank), headless=headless)
    assert "\n" not in str(refused.value)


def test_the_wrapper_is_installed_once_and_runs_before_vllm_builds_its_config(twins: dict[str, Path]) -> None:
    from patches_free_hooks.plugin import register

    register()
    register()
    wrapped = EngineArgs.create_engine_config
    engine_config.install()
    assert EngineArgs.create_engine_config is wrapped
    assert getattr(wrapped, "_vllm_helix_wrapped", False)
    with pytest.raises(HelixConfigError, match="tpa=4 exceeds"):
        _args(twins["llama2"], {"kvp": 1, "tpa": 4}).create_engine_config()


def test_dcp_comm_backend_is_refused_on_cpu_where_it_would_do_nothing(twins: dict[str, Path]) -> None:
    with pytest.raises(HelixStartupError, match="--dcp-comm-backend a2a has no effect with Helix on CPU"):
        apply_helix(_args(twins["llama1"], {"kvp": 2, "tpa": 1}, dcp_comm_backend="a2a"))


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend vLLM's platform is CUDA on a Hopper GPU (the translation is pure argument logic)."""
    monkeypatch.setattr(engine_config, "_is_cpu_platform", lambda: False)
    monkeypatch.setattr(engine_config, "_is_cuda_platform", lambda: True)
    monkeypatch.setattr(engine_config, "_cuda_capability", lambda: (9, 0))


def _cuda_args(model: Path, helix: object, **kwargs: object) -> EngineArgs:
    return EngineArgs(model=str(model), additional_config={"helix": helix}, **{"dtype": "bfloat16", **kwargs})


@pytest.mark.parametrize(
    ("model", "capability", "backend", "block", "stripe"),
    [
        ("deepseek", (9, 0), "FLASH_ATTN_MLA", 16, 16),
        ("deepseek", (10, 0), "FLASHINFER_MLA", 32, 1),  # twin's qk_nope_head_dim 64; interleave 1
        ("llama1", (9, 0), "FLASHINFER", 16, 16),
    ],
)
def test_on_cuda_helix_names_an_lse_backend_block_size_and_stripe_without_block_size_flag(
        twins: dict[str, Path], on_cuda: None, monkeypatch: pytest.MonkeyPatch, model: str,
        capability: tuple[int, int], backend: str, block: int, stripe: int) -> None:
    monkeypatch.setattr(engine_config, "_cuda_capability", lambda: capability)
    args = _cuda_args(twins[model], {"kvp": 2, "tpa": 1})
    resolved = apply_helix(args)
    assert (args.tensor_parallel_size, args.decode_context_parallel_size) == (2, 2)
    assert (args.attention_backend, args.block_size) == (backend, block)
    assert (args.cp_kv_cache_interleave_size, args.dcp_comm_backend, resolved.stripe) == (stripe, "a2a", stripe)


def test_on_cuda_a_named_backend_is_kept_and_its_block_rule_applied(twins: dict[str, Path], on_cuda: None) -> None:
    args = _cuda_args(twins["deepseek"], {"kvp": 2, "tpa": 1}, attention_backend="FLASHMLA")
    apply_helix(args)
    assert (args.attention_backend, args.block_size, args.cp_kv_cache_interleave_size) == ("FLASHMLA", 64, 64)


@pytest.mark.parametrize(
    ("model", "helix", "kwargs", "message"),
    [
        ("llama1", {"kvp": 2, "tpa": 1, "hopb": 2}, {}, "hopb=2: HOP-B runs in the plugin's CPU backends"),
        ("llama1", {"kvp": 2, "tpa": 1}, {"dcp_comm_backend": "ag_rs"},
         "--dcp-comm-backend ag_rs is not Helix's exchange"),
        ("deepseek", {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 2}, {},
         r"helix ep=2: the MoE TPF x EP grid is built on vLLM's CPU experts only.*use ep=1,tpf=2"),
        ("deepseek", {"kvp": 2, "tpa": 1}, {"dtype": "float32"}, "take float16/bfloat16 only; pass --dtype bfloat16"),
        ("deepseek", {"kvp": 2, "tpa": 1}, {"attention_backend": "FLASHMLA", "block_size": 16},
         r"--attention-backend FLASHMLA: takes block sizes that are multiples of 64, not --block-size 16"),
        ("llama1", {"kvp": 2, "tpa": 1}, {"attention_backend": "CPU_ATTN"}, "CPU_ATTN cannot run Helix's shards"),
    ],
)
def test_cuda_specific_refusals(twins: dict[str, Path], on_cuda: None, model: str, helix: dict, kwargs: dict,
                                message: str) -> None:
    with pytest.raises(HelixStartupError, match=message):
        apply_helix(_cuda_args(twins[model], helix, **kwargs))


@pytest.mark.parametrize(
    ("model", "named", "message"),
    [
        ("deepseek", "AMX_MLA", r"--attention-backend AMX_MLA: Helix on CPU runs MLA attention in the plugin's "
                                r"CPU_MLA backend"),
        ("llama1", "FLASH_ATTN", r"--attention-backend FLASH_ATTN: Helix on CPU runs GQA attention in the plugin's "
                                 r"CPU_ATTN backend"),
    ],
)
def test_on_cpu_a_backend_that_cannot_run_helix_is_refused_not_ignored(
        twins: dict[str, Path], model: str, named: str, message: str) -> None:
    with pytest.raises(HelixStartupError, match=message):
        apply_helix(_args(twins[model], {"kvp": 2, "tpa": 1}, attention_backend=named))


def test_suggested_layouts_fit_the_cores(twins: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setattr(engine_config.os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(HelixStartupError) as refused:
        apply_helix(_args(twins["llama1"], {"kvp": 2, "tpa": 1}, tensor_parallel_size=4))
    assert "drop --tensor-parallel-size (Helix sets it to 2)" in str(refused.value)
    assert "kvp=4" not in str(refused.value)  # 4 workers cannot start on 2 cores
    with pytest.raises(HelixStartupError, match=r"tpa=1 is below the model's 2 KV heads.*so use kvp=1,tpa=2 on 2 "
                                                 r"workers"):
        apply_helix(_args(twins["llama2"], {"kvp": 2, "tpa": 1}))
    four_kv_heads = make_tiny_model(tmp_path / "llama4", "llama", kv_heads=4)
    with pytest.raises(HelixStartupError, match=r"a kvp>1 layout needs at least 8 workers \(kvp=2,tpa=4\) and "
                                                 r"this machine has 2 cores: serve it without Helix"):
        apply_helix(_args(four_kv_heads, {"kvp": 2, "tpa": 1}))
