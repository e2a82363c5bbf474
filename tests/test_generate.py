"""Generation: parity with transformers, sampling, stopping, bucketing, the rolling cache."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax import native
from mixtral_jax.infer import decode as programs
from mixtral_jax.infer import sampling
from mixtral_jax.infer.generate import Generator, Request, generate
from mixtral_jax.moe import reference_experts, route, sorted_experts

PROMPTS = [[1, 17, 33, 5], [1, 90, 12, 7, 7, 41, 3, 8, 60, 22, 11], [1, 4], [1, 50, 51, 52, 53, 54, 55]]


@pytest.fixture(scope="module")
def model():  # the reference MoE compiles fastest; parity runs the default path
    return mj.init(mj.preset("tiny", initializer_range=0.2, moe_impl="reference"), seed=3)


@pytest.fixture(params=[programs.PANELS, programs.SPLIT])
def cpu_layout(request, monkeypatch):
    """Each layout CPU generation may keep its weights in: PANELS where the native kernel
    runs, SPLIT (the kernel switched off) everywhere on CPU. Off CPU (no weights of its own:
    None), one run."""
    if jax.default_backend() != "cpu":
        if request.param == programs.SPLIT:
            pytest.skip("one run off CPU")
        return None
    if request.param == programs.PANELS and not native.available():
        pytest.skip("the native kernel does not build here")
    if request.param == programs.SPLIT:
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


class CharTokenizer:
    """A stand-in tokenizer: id i > 2 is one letter, 0-2 (pad, bos, eos) are silent."""

    eos_id = 2

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids if i > 2)

    def stream(self):
        tokenizer = self

        class Stream:
            def push(self, token):
                return tokenizer.decode([token])

            def flush(self):
                return ""

        return Stream()


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_greedy_matches_transformers(tmp_path, sliding_window, cpu_layout):
    torch = pytest.importorskip("torch")
    from hf_utils import make_hf_model
    from mixtral_jax.loading import load

    hf_model, directory = make_hf_model(tmp_path, seed=1, sliding_window=sliding_window)
    ours = load(directory)
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 128, n - 1).tolist()] for n in (3, 9, 14)]
    max_new = 14  # prompt + new tokens exceed the window: the rolling cache is exercised
    results = generate(ours, prompts, max_new_tokens=max_new)
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                    do_sample=False, use_cache=True, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        assert result.tokens == expected
        assert result.finish_reason == ("eos" if expected[-1] == 2 else "length")


def test_rolling_cache_matches_full_recompute():
    config = mj.preset("tiny", sliding_window=4, initializer_range=0.2, moe_impl="reference")
    model = mj.init(config, seed=0)
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray([[1, 9, 30, 4, 77, 12, 5, 200, 31, 8]])
    full = model(tokens)  # [1, 10, V], sliding-window mask, no cache

    @jax.jit
    def step(params, tokens, positions, cache):
        out = nnx.merge(graphdef, params).forward(tokens, positions, cache=cache)
        return out.logits, out.cache

    cache = model.init_cache(1, 4)  # rolling: 4 slots hold positions p % 4
    logits, cache = step(params, tokens[:, :6], jnp.arange(6)[None], cache)  # prefill longer than the window
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for p in range(6, 10):
        logits, cache = step(params, tokens[:, p:p + 1], jnp.asarray([[p]]), cache)
        np.testing.assert_allclose(logits[:, 0], full[:, p], atol=1e-5)
    assert sorted(np.asarray(cache.pos[0, 0]).tolist()) == [6, 7, 8, 9]


def test_seed_gives_same_text_and_seeds_differ(model):
    run = lambda seed: [r.tokens for r in generate(model, PROMPTS, max_new_tokens=12, temperature=1.0,
                                                   top_k=50, top_p=0.95, seed=seed)]
    first = run(0)
    assert run(0) == first
    assert run(1) != first
    assert all(len(tokens) == 12 for tokens in first if 2 not in tokens)


def test_rows_stop_independently_on_eos_stop_string_and_length(model):
    tokenizer = CharTokenizer()
    free = Generator(model, tokenizer, eos_ids=[255]).run([Request(p, 12) for p in PROMPTS])
    free_tokens = [r.tokens for r in free]
    assert [r.finish_reason for r in free] == ["length"] * 4 and 255 not in sum(free_tokens, [])

    eos = free_tokens[1][4]  # row 1 ends on its 5th token
    stop = free[0].text[3:5]  # row 0 ends when these letters appear
    requests = [Request(PROMPTS[0], 12, stop=(stop,)), Request(PROMPTS[1], 12),
                Request(PROMPTS[2], 12), Request(PROMPTS[3], 6)]
    got = Generator(model, tokenizer, eos_ids=[eos], chunk=4).run(requests)

    cut = next(j for j in range(13) if stop in tokenizer.decode(free_tokens[0][:j]))
    assert (got[0].finish_reason, got[0].tokens) == ("stop", free_tokens[0][:cut])
    assert got[0].text == free[0].text[:free[0].text.index(stop)]
    for row, limit in ((1, 12), (2, 12), (3, 6)):
        tokens = free_tokens[row][:limit]
        if eos in tokens:
            assert (got[row].finish_reason, got[row].tokens) == ("eos", tokens[:tokens.index(eos) + 1])
        else:
            assert (got[row].finish_reason, got[row].tokens) == ("length", tokens)
    assert got[1].finish_reason == "eos" and len(got[1].tokens) <= 5


@pytest.mark.parametrize("moe_impl", ["reference", "auto"])  # auto: CPU decode's split weights
def test_continuous_batching_gives_each_request_what_run_gives_it(model, moe_impl):
    if moe_impl != "reference":
        model = mj.init(mj.preset("tiny", initializer_range=0.2, moe_impl=moe_impl), seed=3)
    tokenizer = CharTokenizer()
    prompts = PROMPTS + [p[1:] for p in PROMPTS]
    max_new = [12, 3, 20, 1, 8, 16, 0, 30]
    free = Generator(model, tokenizer, eos_ids=[255]).run([Request(p, 20) for p in prompts])
    eos = free[2].tokens[3]  # a token that ends some rows early
    stop = free[0].text[2:4]
    greedy = [Request(p, n, stop=(stop,) if i == 0 else ()) for i, (p, n) in enumerate(zip(prompts, max_new))]
    sampled = [Request(p, n, temperature=0.9, top_k=5 * (i % 2), top_p=0.8 if i % 3 else 1.0, seed=i)
               for i, (p, n) in enumerate(zip(prompts, max_new))]
    generator = Generator(model, tokenizer, eos_ids=[eos], chunk=4)
    for requests in (greedy, sampled):
        expected = generator.run(requests)
        got = dict(pair for finished in generator.run_continuous(requests, rows=2) for pair in finished)
        assert sorted(got) == list(range(len(requests)))
        assert [got[i] for i in range(len(requests))] == expected
    kwargs = {"max_new_tokens": 9, "temperature": 0.9, "top_k": 5, "seed": 7}
    assert generate(model, prompts, **kwargs) == generate(model, prompts, batch_size=3, **kwargs)
    # one long request holds a row while the short ones pass through the other
    requests = [Request(PROMPTS[1], 30), Request(PROMPTS[0], 1), Request(PROMPTS[2], 1), Request(PROMPTS[3], 2)]
    order = [i for finished in Generator(model, eos_ids=[255]).run_continuous(requests, rows=2)
             for i, _ in finished]
    assert order == [1, 2, 3, 0]
    reasons = {c.finish_reason for c in expected} | {c.finish_reason for c in generator.run(greedy)}
    assert {"eos", "stop", "length"} <= reasons


def test_streamed_text_equals_final_text(model):
    pieces = {}
    results = generate(model, PROMPTS, CharTokenizer(), max_new_tokens=12,
                       on_text=lambda i, text: pieces.setdefault(i, []).append(text))
    assert ["".join(pieces[i]) for i in range(4)] == [r.text for r in results]
    assert len(pieces[0]) > 1  # arrived in several segments


def test_prompt_lengths_share_compiled_programs(model):
    rng = np.random.default_rng(1)
    prompts = lambda n: [[1, *rng.integers(3, 256, m - 1).tolist()] for m in (n, 2, 3, 4)]
    counts = lambda: (programs.prefill._cache_size(), programs.decode._cache_size())
    generate(model, prompts(3), max_new_tokens=12)  # compiles (or reuses) bucket 16
    before = counts()
    generate(model, prompts(17), max_new_tokens=12)
    assert counts() == (before[0] + 1, before[1] + 1)  # bucket 32: one prefill, one decode loop
    for n in (5, 9, 12, 16, 20, 25, 30, 32):
        generate(model, prompts(n), max_new_tokens=12 - n % 3)
    assert counts() == (before[0] + 1, before[1] + 1)


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
    logits = jnp.log(jnp.asarray(np.tile(probs, (4, 1))))
    kept = lambda f: np.isfinite(np.asarray(f.filter(logits)))
    top_k = sampling.TopK(jnp.asarray([1, 2, 3, 0]), 4)
    assert kept(top_k).tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 1, 1], [1] * 5]
    top_p = sampling.TopP(jnp.asarray([0.5, 0.6, 0.8, 1.0]))
    assert kept(top_p).tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 1, 1], [1] * 5]

    # draws follow the renormalised distribution: top_p 0.8 keeps {0.5, 0.2, 0.15}
    sampler = sampling.make_sampler(1.0, 0, 0.8, batch=20000)
    draws = sampler(jnp.log(jnp.asarray(np.tile(probs, (20000, 1)))), sampling.row_keys(np.arange(20000)))
    freq = np.bincount(np.asarray(draws), minlength=5) / 20000
    np.testing.assert_allclose(freq, [0, 0.5 / 0.85, 0, 0.2 / 0.85, 0.15 / 0.85], atol=0.015)


def test_temperature_zero_is_greedy_per_row():
    logits = jnp.asarray([[0.1, 3.0, 2.9], [0.1, 3.0, 2.9]])
    sampler = sampling.make_sampler([0.0, 100.0], batch=2)
    draws = np.stack([np.asarray(sampler(logits, sampling.row_keys([s, s]))) for s in range(200)])
    assert (draws[:, 0] == 1).all()  # the greedy row never moves
    assert len(set(draws[:, 1])) == 3  # the hot row visits every token
    assert isinstance(sampling.make_sampler(0.0, 40, 0.9, batch=2), sampling.Greedy)


@pytest.mark.parametrize("vocab", [384, 300])  # whole chunks, and a padded last chunk
def test_argmax_is_jnp_argmax_with_ties_nans_and_infinities(vocab):
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 40, (8, vocab)).astype(np.float32)  # many ties, across chunks too
    logits[1] = -np.inf
    logits[2, [7, 250]] = np.nan  # the first NaN wins, as in jnp.argmax
    logits[3, 200], logits[3, 5] = np.inf, np.nan
    logits[4, -1] = 100.0  # the maximum in the last (padded) chunk
    logits[5, 130] = logits[5, 260] = 100.0  # a tie between chunks: the first
    got = jax.jit(sampling.argmax)(jnp.asarray(logits))
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(logits), axis=-1))
    assert got.dtype == jnp.int32


def test_categorical_draws_what_jax_random_categorical_draws():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(64, 300)).astype(np.float32))
    keys = sampling.row_keys(np.arange(64))
    got = sampling.make_sampler(1.0, batch=64)(logits, keys)
    np.testing.assert_array_equal(got, jax.vmap(jax.random.categorical)(keys, logits))


def test_expert_parallel_mesh_generates_the_same_tokens(model):
    from mixtral_jax import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=4))
    sharded = sharding.init_model(model.config, mesh, seed=3)  # the same weights as `model`
    expected = [r.tokens for r in generate(model, PROMPTS, max_new_tokens=12)]
    assert [r.tokens for r in generate(sharded, PROMPTS, max_new_tokens=12, mesh=mesh)] == expected


def test_generate_command_streams_text(tmp_path, capsys):
    from mixtral_jax.checkpoint import save_params
    from mixtral_jax.cli import main
    from mixtral_jax.tokenizer import ByteTokenizer

    config = mj.preset("tiny", vocab_size=259, tokenizer="bytes", moe_impl="reference")
    save_params(tmp_path / "run", mj.init(config, seed=0))
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "hi", "tokenizer=bytes",
            "compile_cache="]
    assert main(args + ["max_new_tokens=5"]) == 0
    captured = capsys.readouterr()
    (expected,) = generate(mj.init(config, seed=0), ["hi"], ByteTokenizer(), max_new_tokens=5)  # greedy
    assert captured.out == expected.text + "\n"  # the streamed pieces add up to the whole text
    assert f"[{len(expected.tokens)} tokens, " in captured.err
    assert captured.err.rstrip().endswith(f"finish: {expected.finish_reason}]")
    assert main(args + ["temperature=-1"]) == 2
    assert main(args + ["max_new_tokens=lots"]) == 2


def test_generate_command_rejects_bad_settings_in_one_line(tmp_path, capsys):
    from mixtral_jax.checkpoint import save_params
    from mixtral_jax.cli import main

    config = mj.preset("tiny", vocab_size=259, tokenizer="bytes", moe_impl="reference")
    save_params(tmp_path / "run", mj.init(config, seed=0))
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "tokenizer=bytes", "compile_cache=",
            "max_new_tokens=3"]
    prompt = ["--prompt", "The"]  # after the key=value settings
    for settings, word in [(["seed=-1", "temperature=1"], "2**32"), (["seed=99999999999"], "2**32"),
                           (["temperature=nan"], "temperature"), (["top_p=nan", "temperature=1"], "top_p"),
                           (["temperature=inf"], "temperature"), (['stop=[""]'], "stop"),
                           (["max_new_tokens=-1"], "max_new_tokens must be >= 0, got -1"),
                           (["seq_len=1"], "seq_len must be >= 2, got 1")]:
        assert main(args + settings + prompt) == 2, settings
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and word in err, err
    assert main(args + ["--prompt", "ab\udcffc"]) == 2  # how Python hands over argv's byte 0xff
    assert "--prompt:1: not valid UTF-8 (byte 0xff)" in capsys.readouterr().err
    assert main(args + prompt + ["--system", "be brief"]) == 2  # --system is for --chat turns only
    assert "--system only applies with --chat" in capsys.readouterr().err
    assert main(args + ["--chat"]) == 2
    assert "the byte tokenizer has no chat format" in capsys.readouterr().err
    assert main(args + ["top_k=99999999999", "temperature=1"] + prompt) == 0  # k >= vocabulary: keep all


def test_sampling_settings_are_checked_not_overflowed():
    for settings, word in [((float("nan"),), "temperature"), ((1.0, 0, float("nan")), "top_p"),
                           ((float("inf"),), "temperature"), ((1.0, -1), "top_k"), ((1.0, 10**400), "top_k")]:
        with pytest.raises(ValueError, match=word):
            sampling.make_sampler(*settings)
    huge = sampling.make_sampler(1.0, 99999999999, vocab_size=259)  # clamped, not an int32 overflow
    assert huge.filters[1].k.tolist() == [259]
    unbounded = sampling.make_sampler(1.0, 99999999999)  # no vocab_size: the logits bound k
    assert np.isfinite(np.asarray(unbounded.filters[1].filter(jnp.zeros((1, 7))))).all()
    for seed in (-1, 2**32, 99999999999, True, 1.5):
        with pytest.raises(ValueError, match=r"0 <= seed < 2\*\*32"):
            sampling.row_keys([0, seed])
    assert sampling.check_seeds([0, 2**32 - 1]).tolist() == [0, 2**32 - 1]


@pytest.mark.parametrize("layout", [programs.SPLIT, programs.PANELS])
def test_split_weights_restack_exactly_and_cheaply(layout):
    """split_layers then _merge gives the model's own arrays back (expert weights transposed,
    as blocked_ffn(out_in=True) reads them, or in panels, as panels_ffn does), with work per
    leaf (not per row: re-stacking once sliced the embedding row by row, a 60 s compile)."""
    model = mj.init(mj.preset("tiny", vocab_size=4096), seed=0)
    graphdef, params = nnx.split(model)
    split = programs.split_layers(params, layout)
    stored = (lambda w: np.swapaxes(w, -1, -2)) if layout == programs.SPLIT else native.to_panels
    merged = nnx.to_pure_dict(nnx.state(programs._merge(graphdef, split, layout)))
    flat_merged = jax.tree_util.tree_flatten_with_path(merged)[0]
    for (path, got), want in zip(flat_merged, jax.tree.leaves(nnx.to_pure_dict(params)), strict=True):
        expert = str(path[-1].key) in ("w_gate", "w_up", "w_down")
        np.testing.assert_array_equal(got, stored(want) if expert else want)
    jaxpr = jax.make_jaxpr(lambda p: nnx.state(programs._merge(graphdef, p, layout)))(split)
    assert len(jaxpr.eqns) < 4 * len(jax.tree.leaves(split))  # 65 leaves; a row-wise restack: > 4096


def _compiled_decode(config, prompt_len: int = 3, new_tokens: int = 4, prompts: int = 1):
    """(the optimized HLO text of the decode loop for `prompts` prompts, the layout of the
    generator's weights, the shape of the cache's keys [L, B, K, H, S])."""
    generator = Generator(mj.init(config, seed=0), eos_ids=[-1])
    batch = generator.prepare([Request(list(range(1 + row, prompt_len + 1 + row)), new_tokens)
                               for row in range(prompts)])
    state = generator.prefill(batch)
    hlo = programs.decode.lower(generator.graphdef, generator.params, state, batch.rows, batch.sampler,
                                new_tokens, experts_fn=generator.experts_fn, layout=generator.layout)
    return hlo.compile().as_text(), generator.layout, state.cache.k.shape


def _loop_body(hlo: str) -> str:
    """The HLO text of the largest while loop's body computation (the decode step)."""
    bodies = []
    for name in re.findall(r"while\([^\n]*body=%?([\w.\-]+)", hlo):
        start = hlo.index(f"%{name} (")
        bodies.append(hlo[start:hlo.index("\n}", start)])
    return max(bodies, key=len)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="generation splits the weights on CPU only")
def test_cpu_decode_loop_copies_no_expert_weights(cpu_layout):
    """XLA:CPU copies a weight sliced out of a stacked array before each matmul; the decode
    loop must read the split per-expert buffers (or per-layer panels) in place instead."""
    config = mj.preset("tiny", moe_impl="grouped")
    hlo, layout, _ = _compiled_decode(config)
    assert layout == cpu_layout
    d, f, p = config.hidden_size, config.intermediate_size, native.PANEL
    panels = rf"\d+,{-(-f // p)},{d},{p}|\d+,{-(-d // p)},{f},{p}"
    weight_shape = re.compile(rf"^\s*f32\[({d},{f}|{f},{d}|{panels})\]")
    copies = [line for line in hlo.splitlines()
              if "=" in line and "slice" in line.split("=")[0] and weight_shape.match(line.split("=", 1)[1])]
    assert not copies, copies[:2]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a layout choice of XLA:CPU")
def test_cpu_decode_loop_reorders_no_attention_weight():
    """No decode step copies an attention projection into another dim order (XLA:CPU did so
    for the output projection while it contracted two dims: 1 MB a layer, every step, in
    bench-small)."""
    config = mj.preset("tiny", moe_impl="grouped")
    hlo, _, _ = _compiled_decode(config)
    head_dim = config.hidden_size // config.num_attention_heads
    weight_dims = [sorted((heads, head_dim, config.hidden_size))
                   for heads in (config.num_attention_heads, config.num_key_value_heads)]
    reordered = [m.group(0) for m in re.finditer(r"= f32\[([\d,]+)\]\S* (copy|transpose)\(", hlo)
                 if sorted(map(int, m.group(1).split(","))) in weight_dims]
    assert not reordered, reordered[:2]


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_step_updates_the_cache_in_place(batch):
    """Each decode step scatters its keys/values into the cache and attends to the cache as
    stored: no op of the step copies the whole cache (re-stacking layers), a layer's part of
    it (on CPU from 2 rows on, each layer's keys and values are buffers of their own), or a
    cache-plus-one."""
    hlo, layout, (layers, rows, kv_heads, head_dim, slots) = _compiled_decode(
        mj.preset("tiny", moe_impl="grouped"), prompts=batch)
    body = _loop_body(hlo)
    cache_part = re.compile(rf"%(\S+) = f32\[(?:{layers},|1,)?{rows},{kv_heads},{head_dim},{slots}\]\S* ([\w-]+)\(")
    in_place = ("scatter", "dynamic-update-slice")
    copied = [m.group(0) for m in cache_part.finditer(body)
              if m.group(2) not in ("parameter", "get-tuple-element", "bitcast", *in_place)
              and not (m.group(2) == "fusion" and any(op in m.group(1).replace("_", "-") for op in in_place))]
    assert not copied, copied[:2]
    assert not re.search(rf"f32\[[0-9,]*\b{slots + 1}\b", hlo)  # keys of the cache and the new token
    per_layer = f"f32[{rows},{kv_heads},{head_dim},{slots}]" in body.splitlines()[0]  # the loop's carry
    assert per_layer == (layout is not None and batch > 1)


# a row; few rows (transposed matmuls), alone or a head block twice the tail (decode's from 4 rows
# per expert); many (plain), alone or with halved blocks down to 4 rows; first blocks taken by
# every expert (one of them empty), with rows past them (the masked loops) and without
@pytest.mark.parametrize("block, tail, first_blocks", [(1, None, False), (4, None, False), (8, 4, False),
                                                       (64, None, False), (32, 4, False), (8, 4, True),
                                                       (64, None, True)])
@pytest.mark.parametrize("out_in", [False, True])
def test_blocked_ffn_equals_reference_experts(block, tail, first_blocks, out_in):
    """Prefill and decode's expert path equals every-expert-on-every-token, in both weight layouts."""
    n, d, f, e = 40, 16, 24, 4
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d))
    router_logits = jax.random.normal(keys[1], (n, e))
    if first_blocks:  # expert 1 gets no rows: its first block holds only the next group's rows
        router_logits = router_logits.at[:, 1].set(-30.0)
    weights, expert_idx = route(router_logits, 2)
    assert first_blocks == (not jnp.any(expert_idx == 1))
    w_gate, w_up = (jax.random.normal(k, (e, d, f)) / 4 for k in keys[2:4])
    w_down = jax.random.normal(keys[4], (e, f, d)) / 4
    want = reference_experts(x, expert_idx, weights, w_gate, w_up, w_down)[0]
    stored = [jnp.swapaxes(w, 1, 2) if out_in else w for w in (w_gate, w_up, w_down)]
    blocked = functools.partial(programs.blocked_ffn, block=block, tail=tail, out_in=out_in,
                                first_blocks=first_blocks)
    got = jax.jit(sorted_experts(blocked))(x, expert_idx, weights, *stored)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bench_decode_reports_both_sides_and_the_bound():
    """`bench decode` on a tiny preset: every documented number, the speedup is the ratio of
    the two decode rates (one round: no median to differ), and at every batch the bound ratio
    is the bound over JAX's rate."""
    import argparse

    from mixtral_jax.infer import bench

    args = argparse.Namespace(presets="tiny", batches="1,3", prompt_len=8, new_tokens=16, repeats=1, no_torch=False)
    report = bench.run(args)
    assert [(r["preset"], r["batch"]) for r in report["results"]] == [("tiny", 1), ("tiny", 3)]
    for entry in report["results"]:
        jax_side, torch_side = entry["jax"], entry["torch"]
        assert set(jax_side) == {"compile_s", "time_to_first_token_s", "prefill_tokens_per_s",
                                 "decode_tokens_per_s", "end_to_end_tokens_per_s"}
        assert min(jax_side.values()) > 0 and min(torch_side.values()) > 0
        ratio = jax_side["decode_tokens_per_s"] / torch_side["decode_tokens_per_s"]
        assert entry["speedup_vs_torch"] == pytest.approx(ratio, rel=0.02, abs=0.01)
        assert entry["bound_ratio"] == pytest.approx(
            entry["bandwidth_bound_tokens_per_s"] / jax_side["decode_tokens_per_s"], rel=0.02)


def test_decode_bytes_per_step_count_the_experts_a_batch_reaches():
    """Batch 1 reads the active weights (one embedding row) and its cache; a large batch reads
    every expert once and each row's embedding row and cache."""
    from mixtral_jax.infer.bench import bytes_per_step

    config = mj.preset("bench-small")
    d, itemsize = config.hidden_size, 4  # float32 weights and cache
    cache = 2 * config.num_hidden_layers * config.kv_dim * 100 * itemsize  # one row, 100 tokens
    assert bytes_per_step(config, 1, 100) == pytest.approx(
        (config.num_active_params - (config.vocab_size - 1) * d) * itemsize + cache)
    every_expert = (config.num_params - config.vocab_size * d + 1000 * d) * itemsize + 1000 * cache
    assert bytes_per_step(config, 1000, 100) == pytest.approx(every_expert)
    # 32 rows, top-2 of 8: 8 * (1 - 0.75^32) = 7.992 experts per layer, not 32 * 2
    expert_bytes = config.num_hidden_layers * 3 * d * config.intermediate_size * itemsize
    assert bytes_per_step(config, 32, 100) == pytest.approx(
        every_expert - (1000 - 32) * (d * itemsize + cache) - 8 * 0.75**32 * expert_bytes)


def test_chat_answers_each_turn_with_the_whole_conversation(tmp_path, capsys, monkeypatch):
    import io

    from mixtral_jax.checkpoint import save_params
    from mixtral_jax.cli import main
    from mixtral_jax.tokenizer import Tokenizer

    config = mj.preset("tiny", vocab_size=32000, moe_impl="reference", initializer_range=0.2)
    model = mj.init(config, seed=0)
    save_params(tmp_path / "run", model)
    turns = ["hi", "and then?", "/reset", "hello"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--chat", "--system", "be brief",
                 "max_new_tokens=4", "compile_cache="]) == 0
    out = capsys.readouterr().out
    # the replies the API gives the conversation as the command keeps it
    system = [{"role": "system", "content": "be brief"}]
    messages, expected = list(system), ""
    for turn in turns:
        expected += "> "  # input()'s prompt
        if turn == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": turn})
        (reply,) = generate(model, [messages], Tokenizer(), max_new_tokens=4)
        expected += reply.text + "\n"
        if reply.text.strip():
            messages.append({"role": "assistant", "content": reply.text})
        else:  # an empty answer is dropped with its question
            messages.pop()
    assert out == expected + "> "  # the last prompt reads the end of the input


def test_chat_outliving_the_context_says_so_and_goes_on(tmp_path, capsys, monkeypatch):
    import io

    from mixtral_jax.checkpoint import save_params
    from mixtral_jax.cli import main

    config = mj.preset("tiny", vocab_size=32000, max_position_embeddings=64, moe_impl="reference")
    save_params(tmp_path / "run", mj.init(config, seed=0))
    turns = ["hi", "a very long turn " * 20, "/reset", "hello", ""]  # the second cannot fit the context
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--chat", "max_new_tokens=3", "compile_cache="]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("finish: ") == 2  # the first and the last turn answered
    assert len(re.findall(r"error: .*context.*\(/reset starts over\)", err)) == 1, err


def test_generate_arguments_a_caller_may_get_wrong():
    from mixtral_jax.configtools import UserError
    from mixtral_jax.tokenizer import ByteTokenizer, Tokenizer

    model = mj.init(mj.preset("tiny", vocab_size=272, moe_impl="reference"), seed=0)
    bytes_ = ByteTokenizer()
    run = functools.partial(generate, model, ["ab", "ab"], bytes_, max_new_tokens=4, temperature=1.0)
    wrapped, plain = run(seed=2**32 - 1), run(seed=0)
    assert wrapped[1].tokens == plain[0].tokens != plain[1].tokens  # seed + i wraps around to 0
    assert [r.text for r in run(stop="xy")] == [r.text for r in run(stop=["xy"])]  # one string, not x and y
    assert [r.tokens for r in run(seed=np.int32(5))] == [r.tokens for r in run(seed=5)]  # seed + 1 fits
    for kwargs, message in [({"batch_size": 0}, "batch_size"), ({"batch_size": 1.5}, "batch_size"),
                            ({"seed": -1}, "2\\*\\*32"), ({"max_new_tokens": "3"}, "max_new_tokens must be an integer"),
                            ({"temperature": "0.7"}, "temperature must be a number"),
                            ({"top_k": 2.5}, "top_k must be an integer"), ({"temperature": None}, "got None")]:
        with pytest.raises(UserError, match=message):
            run(**kwargs)
    greedy = functools.partial(generate, model, max_new_tokens=3)
    ids = [[1, 5, 9], [1, 7, 8]]
    expected = [r.tokens for r in greedy(ids)]
    assert [r.tokens for r in greedy(np.array(ids))] == expected  # a 2-D array: rows of ids
    assert [r.tokens for r in greedy([jnp.array(i) for i in ids])] == expected
    assert [r.text for r in greedy(["ab"], "bytes")] == [r.text for r in greedy(["ab"], bytes_)]  # a name
    for prompts, message in [((p for p in ids), "`prompts` is a list of prompts .* got generator"),
                             ([b"ab"], "a prompt of bytes: decode it"),
                             ([np.array([1.0, 2.0])], "an array prompt holds token ids")]:
        with pytest.raises(UserError, match=message):
            greedy(prompts, bytes_)
    generator = Generator(model, bytes_)
    for request, message in [(Request([1, 2], 3, stop="xy"), "stop is a tuple of strings"),
                              (Request([1.5, 2.0], 3), "prompt is a list of token ids"),
                              (Request("hello", 3), "prompt is a list of token ids"),
                              (Request([1, 2], 3, temperature=np.array([0.5])), "temperature is one number")]:
        with pytest.raises(UserError, match=message):
            generator.run([request])
    with pytest.raises(UserError, match="chunk must be a positive integer, got 0"):
        Generator(model, bytes_, chunk=0)
    with pytest.raises(UserError, match="32000 pieces but the model's vocabulary 272"):
        generate(model, ["ab"], Tokenizer(), max_new_tokens=2)
    from mixtral_jax.sharding.config import MeshConfig

    with pytest.raises(UserError, match="mesh must be a jax.sharding.Mesh .* got MeshConfig"):
        generate(model, ["ab"], bytes_, max_new_tokens=2, mesh=MeshConfig(data=1))
