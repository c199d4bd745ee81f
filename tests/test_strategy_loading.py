"""Strategy strings become strategies in one place, and every mistake is named plainly."""
from pathlib import Path

import pytest
import torch

import titans_lightning.strategy as strategy_module
from titans_lightning import MACTitan, NeuralMemory, StrategyError, load_strategy
from titans_lightning.strategy import builtin_strategies

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "custom_memory.py"


def write_rule(tmp_path, extra="", name="my_rule.py"):
    """The template, with ``extra`` appended (later definitions replace the template's)."""
    path = tmp_path / name
    path.write_text(TEMPLATE.read_text() + "\n\n" + extra)
    return path


# -- resolving ------------------------------------------------------------------------------------
def test_builtins_are_discovered_from_the_strategies_package():
    names = builtin_strategies()
    assert {"titans_default", "adam_gated", "contrastive_ema"} <= set(names)
    assert strategy_module.BUILTIN == names
    for name in names:
        assert load_strategy(name).__name__ == f"titans_lightning.strategies.{name}"


def test_template_from_a_temp_file_runs_end_to_end(tmp_path):
    path = write_rule(tmp_path)
    rule = load_strategy(str(path))
    assert all(callable(getattr(rule, name)) for name in strategy_module.CONTRACT)
    torch.manual_seed(0)
    model = MACTitan(context_window=4, dim_feedforward=16, strategy=str(path))
    x = torch.randn(2, 12, 1)
    preds, valid = model(x)
    preds[:, valid].pow(2).mean().backward()
    assert model.emb.weight.grad is not None
    for memory in model.memories:
        assert int(memory.num_updates) == 3 and int(memory.skipped_updates) == 0


def test_template_matches_the_builtin_default_rule(tmp_path, monkeypatch):
    # the built-in rule's keys and values, on their kernel, agree with the template's operators
    # to rounding (tests/test_kernels.py); here both take the operators, so they agree exactly
    monkeypatch.setenv("TITANS_LIGHTNING_KERNELS", "0")
    x = torch.randn(1, 6, 16)
    memories = []
    for spec in ("titans_default", str(write_rule(tmp_path))):
        torch.manual_seed(0)
        memories.append(NeuralMemory(strategy=spec))
        memories[-1].update(x)
    assert torch.equal(memories[0].fast_weights, memories[1].fast_weights)


def test_dotted_module(tmp_path, monkeypatch):
    write_rule(tmp_path, name="my_dotted_rule.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_strategy("my_dotted_rule").__name__ == "my_dotted_rule"


def test_unknown_name_lists_the_builtins():
    with pytest.raises(StrategyError, match=r"unknown memory strategy 'no_such_rule'.*adam_gated"):
        load_strategy("no_such_rule")


def test_errors_are_value_errors():
    assert issubclass(StrategyError, ValueError)


# -- files that do not load -----------------------------------------------------------------------
def test_file_not_found(tmp_path):
    missing = tmp_path / "nowhere" / "rule.py"
    with pytest.raises(StrategyError, match=r"rule\.py' not found"):
        load_strategy(str(missing))


def test_syntax_error_shows_the_files_own_traceback(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import torch\n\ndef init_memory_state(memory, emb_dim:\n    pass\n")
    with pytest.raises(StrategyError) as info:
        load_strategy(str(path))
    message = str(info.value)
    assert "failed to import: SyntaxError" in message
    assert f'File "{path}", line 3' in message
    assert "def init_memory_state(memory, emb_dim:" in message


def test_import_error_shows_the_files_own_traceback(tmp_path):
    path = write_rule(tmp_path, "import not_a_real_module_for_titans\n")
    with pytest.raises(StrategyError) as info:
        load_strategy(str(path))
    message = str(info.value)
    assert "ModuleNotFoundError" in message and "not_a_real_module_for_titans" in message
    assert f'File "{path}", line' in message


def test_error_while_running_the_file(tmp_path):
    path = write_rule(tmp_path, "SCALE = 1 / 0\n")
    with pytest.raises(StrategyError, match=r"failed to import: ZeroDivisionError") as info:
        load_strategy(str(path))
    assert "SCALE = 1 / 0" in str(info.value)


# -- the contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(strategy_module.CONTRACT))
def test_missing_function_is_named(tmp_path, name):
    path = write_rule(tmp_path, f"del {name}\n")
    with pytest.raises(StrategyError, match=rf"no function `{name}`"):
        load_strategy(str(path))


def test_wrong_signature_names_the_function_and_the_expected_signature(tmp_path):
    path = write_rule(tmp_path, "def compute_surprise(memory, keys):\n    return keys.sum()\n")
    with pytest.raises(StrategyError) as info:
        load_strategy(str(path))
    message = str(info.value)
    assert "`compute_surprise` has the signature compute_surprise(memory, keys)" in message
    assert "expected compute_surprise(memory, keys, values)" in message


# -- the probe -------------------------------------------------------------------------------------
BROKEN = {
    "init_memory_state": "def init_memory_state(memory, emb_dim):\n"
                         "    raise RuntimeError('no state for you')\n",
    "compute_keys_values": "def compute_keys_values(memory, x):\n"
                           "    raise RuntimeError('no state for you')\n",
    "compute_surprise": "def compute_surprise(memory, keys, values):\n"
                        "    raise RuntimeError('no state for you')\n",
    "apply_update": "def apply_update(memory, grads, surprise):\n"
                    "    raise RuntimeError('no state for you')\n",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_probe_names_the_function_that_raised(tmp_path, name):
    path = write_rule(tmp_path, BROKEN[name])
    with pytest.raises(StrategyError) as info:
        load_strategy(str(path))
    message = str(info.value)
    assert f"`{name}` raised RuntimeError: no state for you on the probe call" in message
    assert f'File "{path}"' in message  # the user's own line, from the original traceback
    assert isinstance(info.value.__cause__, RuntimeError)


def test_probe_failure_also_stops_a_model_being_built(tmp_path):
    path = write_rule(tmp_path, BROKEN["compute_surprise"])
    with pytest.raises(StrategyError, match="`compute_surprise` raised RuntimeError"):
        MACTitan(context_window=4, dim_feedforward=16, strategy=str(path))


WRONG_RETURNS = {
    "a single tensor": (
        "def compute_keys_values(memory, x):\n    return x\n",
        r"`compute_keys_values` must return a pair \(keys, values\) of \(S, R, d'\) tensors.*"
        r"returned a torch.float32 tensor of shape \(1, 3, 4\)"),
    "keys and values of different lengths": (
        "def compute_keys_values(memory, x):\n    return x, x[:, :2]\n",
        r"`compute_keys_values` must return a pair .* same S and R.*"
        r"a tuple of 2 \(a torch.float32 tensor of shape \(1, 3, 4\), a torch.float32 tensor of "
        r"shape \(1, 2, 4\)\)"),
    "a scalar surprise": (
        "def compute_surprise(memory, keys, values):\n"
        "    return (memory.retrieve(keys) - values).pow(2).mean()\n",
        r"`compute_surprise` must return a float tensor of shape \(S,\) = \(1,\), one surprise per "
        r"memory slot.*returned a torch.float32 tensor of shape \(\)"),
    "a detached surprise": (
        "def compute_surprise(memory, keys, values):\n"
        "    return (memory.retrieve(keys) - values).pow(2).mean(1).sum(-1).detach()\n",
        r"`compute_surprise` returned a surprise that does not depend on the fast weights"),
    "a list of weights": (
        "def apply_update(memory, grads, surprise):\n    return list(memory.weights.values())\n",
        r"`apply_update` must return a dict with exactly the fast weights' names and shapes.*"
        r"'w1': \(1, 8, 4\).*returned a list of 4"),
    "a missing weight": (
        "def apply_update(memory, grads, surprise):\n"
        "    return {n: w for n, w in memory.weights.items() if n != 'b2'}\n",
        r"`apply_update` must return a dict with exactly.*"
        r"returned a dict \{'w1'.*'b1'.*'w2'[^}]*\}$"),
    "a weight of the wrong shape": (
        "def apply_update(memory, grads, surprise):\n"
        "    return {**memory.weights, 'b1': memory.weights['b1'][0]}\n",
        r"`apply_update` must return .*'b1': \(1, 8\).*"
        r"'b1': a torch.float32 tensor of shape \(8,\)"),
}


@pytest.mark.parametrize("case", list(WRONG_RETURNS))
def test_probe_rejects_wrong_return_values(tmp_path, case):
    code, pattern = WRONG_RETURNS[case]
    with pytest.raises(StrategyError, match=pattern):
        load_strategy(str(write_rule(tmp_path, code)))


NON_FINITE = {
    "apply_update": ("def apply_update(memory, grads, surprise):\n"
                     "    return {n: w / 0.0 for n, w in memory.weights.items()}\n",
                     "non-finite weights"),
    "compute_surprise": ("def compute_surprise(memory, keys, values):\n"
                         "    return (memory.retrieve(keys) - values).pow(2).mean(1).sum(-1) "
                         "* float('nan')\n", "a non-finite surprise"),
}


@pytest.mark.parametrize("name", list(NON_FINITE))
def test_probe_warns_about_non_finite_results(tmp_path, name):
    """Not an error: the harness skips such updates safely (and its own tests rely on it)."""
    code, what = NON_FINITE[name]
    with pytest.warns(RuntimeWarning, match=rf"`{name}` produced {what} on the probe call"):
        load_strategy(str(write_rule(tmp_path, code)))


def test_probe_catches_a_rule_that_only_works_with_one_slot(tmp_path):
    code = ("def compute_surprise(memory, keys, values):\n"
            "    return (memory.retrieve(keys) - values).pow(2).sum(-1).mean(-1)[:1]\n")
    with pytest.raises(StrategyError, match=r"shape \(S,\) = \(2,\).*shape \(1,\)"):
        load_strategy(str(write_rule(tmp_path, code)))


def test_probe_leaves_the_global_random_state_alone(tmp_path):
    path = write_rule(tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_strategy(str(path))  # a fresh module: probed
    assert torch.equal(torch.rand(3), expected)


def test_probe_runs_once_per_strategy_and_can_be_skipped(tmp_path, monkeypatch):
    calls = []
    real = strategy_module.probe_strategy

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(strategy_module, "probe_strategy", counting)
    rule = load_strategy(str(write_rule(tmp_path)), probe=False)
    assert calls == []
    load_strategy(rule)
    MACTitan(context_window=4, dim_feedforward=16, strategy=rule)  # once for its two memories
    assert len(calls) == 2  # asked each time, the probe itself ran once
    assert sum(key[0] is rule.init_memory_state for key in strategy_module._probed) == 1


def test_probe_passes_options_to_the_throwaway_memory(tmp_path):
    code = ("DEFAULTS = {'step': 0.1}  # declared, so that the option is accepted\n"
            "def apply_update(memory, grads, surprise):\n"
            "    step = memory.options['step']  # no default: the options must be there\n"
            "    return {n: w - step * grads[n] for n, w in memory.weights.items()}\n")
    path = write_rule(tmp_path, code)
    with pytest.raises(StrategyError, match=r"`apply_update` raised KeyError: 'step'"):
        load_strategy(str(path))
    assert load_strategy(str(path), options={"step": 0.1}).__name__.startswith("titans_user")


# -- strategy strings that are not one --------------------------------------------------------------
@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_strategy_says_what_is_expected(spec):
    with pytest.raises(StrategyError, match=r"\(--model\.strategy\) is an empty string; pass a "
                                            r"built-in name \(adam_gated.*a dotted module.*\.py"):
        load_strategy(spec)


@pytest.mark.parametrize("name", ["rules/mine", "rules/mine.txt"])
def test_path_not_ending_in_py_says_so(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "mine.txt").write_text("not python")
    with pytest.raises(StrategyError, match=rf"'{name}' looks like a path but does not end in "
                                            r"\.py; a strategy file must be a Python file"):
        load_strategy(name)
    write_rule(tmp_path / "rules", name="mine.py")  # the file it probably meant
    with pytest.raises(StrategyError, match=r"does not end in \.py \(did you mean "
                                            r"'rules/mine\.py'\?\)"):
        load_strategy(name)


def test_bad_strings_are_strategy_errors_through_the_module(in_tmp):
    # the module asks for the rule's source before it builds the model: that must not fail first
    from titans_lightning.module import TitansForecaster

    for spec, message in [("", "is an empty string"), ("rules/mine", "does not end in .py"),
                          ("no_such_pkg.rule", "unknown memory strategy")]:
        with pytest.raises(StrategyError, match=message):
            TitansForecaster(strategy=spec, context_window=4, dim_feedforward=16)


def test_misspelt_builtin_gets_a_suggestion():
    with pytest.raises(StrategyError, match=r"unknown memory strategy 'titans_defualt' \(did you "
                                            r"mean 'titans_default'\?\): not a built-in"):
        load_strategy("titans_defualt")


@pytest.mark.parametrize("code, problem", [
    ("def compute_surprise(memory, keys):\n    return keys.sum()\n",
     r"too few parameters \(it takes 2, the harness passes 3\)"),
    ("def compute_surprise(memory, keys, values, scale):\n    return keys.sum()\n",
     r"too many parameters \(it requires 4, the harness passes 3\)"),
    ("def compute_surprise(memory, keys, values, *, scale):\n    return keys.sum()\n",
     r"too many parameters \(keyword-only scale, which the harness never passes\)"),
])
def test_wrong_signature_says_too_few_or_too_many(tmp_path, code, problem):
    with pytest.raises(StrategyError, match=r"expected compute_surprise\(memory, keys, values\): "
                                            + problem):
        load_strategy(str(write_rule(tmp_path, code)))


def test_optional_extra_parameters_are_fine(tmp_path):
    code = ("from titans_lightning.strategies.titans_default import compute_surprise as _default\n"
            "def compute_surprise(memory, keys, values, scale=1.0, *rest, **more):\n"
            "    return scale * _default(memory, keys, values)\n")
    assert load_strategy(str(write_rule(tmp_path, code))).compute_surprise


# -- options: checked against the rule's DEFAULTS ---------------------------------------------------
def test_unknown_option_names_the_near_miss_and_the_declared_options():
    with pytest.raises(StrategyError, match=r"'titans_default' has no option 'thetta' \(did you "
                                            r"mean 'theta'\?\); the options it declares \(its "
                                            r"DEFAULTS\) are alpha, eta, theta$"):
        NeuralMemory(strategy="titans_default", options={"thetta": 0.1})
    with pytest.raises(StrategyError, match=r"no option 'momentum'; the options"):
        load_strategy("adam_gated", options={"momentum": 0.9})


@pytest.mark.parametrize("strategy, option, value, expected", [
    ("titans_default", "theta", "0.1", r"a number \(an int or a float\), like its default 0\.01; "
                                       r"got str '0\.1'"),
    ("titans_default", "eta", [0.9], r"a number .*; got a list of 1"),
    ("titans_default", "alpha", True, r"a number .*; got bool True"),
    ("multi_step", "steps", 2.5, r"a whole number \(an int, or a float such as 2\.0\), like its "
                                 r"default 2; got float 2\.5"),
    ("multi_step", "steps", False, r"a whole number .*; got bool False"),
    ("multi_step", "steps", "3", r"a whole number .*; got str '3'"),
])
def test_option_of_the_wrong_type_names_the_option_and_the_type(strategy, option, value,
                                                                  expected):
    with pytest.raises(StrategyError, match=rf"'{strategy}': option '{option}' must be {expected}"):
        NeuralMemory(strategy=strategy, options={option: value})


@pytest.mark.parametrize("strategy, options", [
    ("titans_default", {"theta": 1}),  # an int is a fine float
    ("multi_step", {"steps": 3.0}),  # a whole float a fine int
    ("omega_window", {"window": 3, "max_rows": 2}),
])
def test_options_of_the_declared_types_are_accepted(strategy, options):
    assert NeuralMemory(strategy=strategy, options=options).options == options


def test_declared_options_are_checked_in_a_users_rule_too(tmp_path):
    path = write_rule(tmp_path)  # the template declares DEFAULTS
    with pytest.raises(StrategyError, match=r"no option 'thetaa' \(did you mean 'theta'\?\)"):
        load_strategy(str(path), options={"thetaa": 0.1})


def test_a_rule_without_defaults_gets_its_options_unchecked(tmp_path):
    code = ("del DEFAULTS  # nothing declared\n"
            "def apply_update(memory, grads, surprise):\n"
            "    step = memory.options.get('step', 0.1)\n"
            "    return {n: w - step * grads[n] for n, w in memory.weights.items()}\n")
    path = write_rule(tmp_path, code)
    memory = NeuralMemory(strategy=str(path), options={"step": 0.2, "anything": "goes"})
    assert memory.options == {"step": 0.2, "anything": "goes"}


# -- strategy state: a misspelt name gets a suggestion ----------------------------------------------
def test_unknown_state_name_suggests_a_registered_one():
    memory = NeuralMemory(strategy="titans_default")
    with pytest.raises(KeyError, match=r"no strategy state named 'momentm' \(did you mean "
                                       r"'momentum'\?\); create it"):
        memory.state["momentm"]
    with pytest.raises(KeyError, match=r"strategy state 'key_projection' \(did you mean "
                                       r"'key_proj'\?\) was not registered"):
        memory.state["key_projection"] = torch.zeros(16, 16)
    with pytest.raises(KeyError, match=r"no strategy state named 'zzz'; create it"):
        memory.state["zzz"]
