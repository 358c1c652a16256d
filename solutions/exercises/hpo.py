"""Chapter 9's exercises: their registrations and the tests that grade a reader's answer.

The objective runs inside a real in-memory Optuna study with a stub ``train_fn`` that yields
prepared per-epoch metrics (validation accuracy and loss, with the best accuracy neither last
nor at the lowest loss); the tests read the trials back: their distributions, the config each
trial trained with, the reported intermediate values, the returned value, and whether a trial
that is worse at every step is pruned and stops training. The study factory is run against
real storages (memory and SQLite in a temporary directory). The best-so-far curve is compared
with a hand-worked case in both directions, with None and NaN entries. Optuna is imported
inside the tests, so that importing the checker never needs it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
from pathlib import Path

from ..checker import CheckFailed, call_answer, register
from ..hpo import best_so_far, make_objective, make_study, search_space_distributions

CHAPTER = "09_optuna"


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna logs every trial at INFO and a failed trial's traceback at WARNING: keep the verdict readable."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield optuna
    finally:
        optuna.logging.set_verbosity(before)


# =======================================================================================
# objective

objective_ex = register("objective", "目的関数 make_objective(train_fn)", chapter=CHAPTER,
                        reference=make_objective)

_OBJ_HINT = ("objective(trial) は、表の 7 つのハイパーパラメータを提案して config（名前 → 値の dict）にまとめ、"
             "train_fn(config) が 1 エポックごとに返す metrics の metrics['val_acc'] を trial.report(値, エポック) で"
             "報告し、trial.should_prune() なら optuna.TrialPruned を送出し、最後まで学習したら全エポックの中で"
             "最も高い検証の正解率を返します。")


class _StubTraining:
    """train_fn(config): yields prepared epochs, records the configs and how many epochs were consumed."""

    def __init__(self, runs):
        self.runs = list(runs)              # one list of (val_acc, val_loss) per call, in call order
        self.configs = []
        self.consumed = []

    def __call__(self, config):
        if not isinstance(config, dict):
            raise CheckFailed(f"train_fn には config を dict で渡してください（{type(config).__name__} でした）。")
        if len(self.configs) >= len(self.runs):
            raise CheckFailed("1 回のトライアルで train_fn を 2 回以上呼んでいます。train_fn(config) は 1 回だけ呼び、"
                              "返ってきたものをエポックごとに取り出します。")
        self.configs.append(dict(config))
        self.consumed.append(0)
        return self._epochs(len(self.configs) - 1)

    def _epochs(self, i):
        for epoch, (acc, loss) in enumerate(self.runs[i], start=1):
            self.consumed[i] = epoch
            yield {"epoch": epoch, "val_acc": acc, "val_loss": loss}


# A run whose best accuracy (epoch 3) is neither the last epoch nor the epoch of the lowest loss (4).
def _run(shift=0.0):
    accs = [0.50, 0.80, 0.90, 0.85, 0.70]
    losses = [1.20, 0.60, 0.45, 0.40, 0.55]
    return [(round(a - shift, 4), round(l_ + shift, 4)) for a, l_ in zip(accs, losses, strict=True)]


def _optimize(answer, train_fn, n_trials, pruner=None, seed=0):
    with _quiet_optuna() as optuna:
        objective = call_answer(answer, train_fn)
        if not callable(objective):
            raise CheckFailed(f"make_objective(train_fn) は関数 objective(trial) を返すはずですが、"
                              f"{type(objective).__name__} が返りました。")
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed),
                                    pruner=pruner or optuna.pruners.NopPruner())
        try:
            study.optimize(objective, n_trials=n_trials)
        except (CheckFailed, NotImplementedError):
            raise
        except Exception as e:
            raise CheckFailed(f"スタディの中で objective を実行すると {type(e).__name__} になりました（{e}）。"
                              + _OBJ_HINT) from None
    return study


def _describe_dist(d) -> str:
    name = type(d).__name__
    if name == "CategoricalDistribution":
        return f"suggest_categorical（候補 {list(d.choices)}）"
    kind = "suggest_float" if name == "FloatDistribution" else "suggest_int"
    extra = ", log=True" if d.log else (f", step={d.step}" if d.step not in (None, 1) else "")
    return f"{kind}({d.low}, {d.high}{extra})"


@objective_ex.test("探索空間: 7 つのハイパーパラメータを表のとおりの範囲・尺度で提案し、すべて train_fn に渡す")
def _(answer, reference):
    expected = search_space_distributions()
    stub = _StubTraining([_run(0.01 * i) for i in range(6)])
    study = _optimize(answer, stub, n_trials=6)
    trial = study.trials[0]
    got = trial.distributions
    missing = [n for n in expected if n not in got]
    if missing:
        raise CheckFailed(f"{', '.join(missing)} を提案していません"
                          f"（trial.suggest_... で名前 {missing[0]!r} を使います）。")
    extra = [n for n in got if n not in expected]
    if extra:
        raise CheckFailed(f"表にない名前 {', '.join(extra)} を提案しています。名前は表のとおりにします。")
    for name, dist in expected.items():
        if _same_distribution(got[name], dist):
            continue
        mine = got[name]
        if (name in ("learning_rate", "weight_decay") and type(mine) is type(dist)
                and (mine.low, mine.high) == (dist.low, dist.high) and not mine.log):
            raise CheckFailed(f"{name} を線形の一様分布で提案しています。{dist.low:g} から {dist.high:g} まで"
                              "何桁にもわたる値は log=True（対数スケール）で提案します。線形だと、提案のほとんどが"
                              "上の 1 桁に集まります。")
        raise CheckFailed(f"{name} の提案が表と違います: {_describe_dist(mine)} でしたが、"
                          f"{_describe_dist(dist)} のはずです。")
    for t, config in zip(study.trials, stub.configs, strict=False):
        lost = [k for k in t.params if k not in config or config[k] != t.params[k]]
        if lost:
            raise CheckFailed(f"提案した {lost[0]} が train_fn(config) に渡っていません（config[{lost[0]!r}] が"
                              f"{'ありません' if lost[0] not in config else '提案した値と違います'}）。"
                              "提案した値はすべて学習に使われなければ、探索しても意味がありません。")
    if len(stub.configs) != len(study.trials):
        raise CheckFailed("train_fn(config) はトライアルごとに 1 回呼びます。")


def _same_distribution(mine, dist) -> bool:
    """Equal distributions; the choices of a categorical may come in any order."""
    if type(mine) is type(dist) and type(dist).__name__ == "CategoricalDistribution":
        return len(mine.choices) == len(dist.choices) and set(mine.choices) == set(dist.choices)
    return mine == dist


def _intermediate(t):
    return [t.intermediate_values[s] for s in sorted(t.intermediate_values)]


@objective_ex.test("エポックごとに検証の正解率を報告し、全エポックの中で最高の検証の正解率を返す（最大化のスタディ）")
def _(answer, reference):
    runs = [_run(0.02 * i) for i in range(4)]
    stub = _StubTraining(runs)
    study = _optimize(answer, stub, n_trials=4)
    for t, run in zip(study.trials, runs, strict=True):
        accs = [a for a, _ in run]
        losses = [l_ for _, l_ in run]
        reported = _intermediate(t)
        if t.state.name == "FAIL":
            raise CheckFailed("トライアルが FAIL で終わりました。objective が数値を返していない（return を忘れた、"
                              "None や NaN を返した）可能性があります。 " + _OBJ_HINT)
        if t.state.name != "COMPLETE":
            raise CheckFailed(f"枝刈りのないスタディ（NopPruner）でトライアルが {t.state.name} で終わりました。"
                              + _OBJ_HINT)
        if not reported:
            raise CheckFailed("trial.report を呼んでいません。エポックごとに検証の正解率を報告しないと、枝刈り"
                              "（pruner）は途中経過を比べられません。")
        steps = sorted(t.intermediate_values)
        if len(reported) != len(accs):
            raise CheckFailed(f"{len(accs)} エポックのうち {len(reported)} 個しか報告されていません。"
                              "trial.report(値, step) の step にはエポックの番号を渡します"
                              "（同じ step で 2 回報告すると、"
                              "2 回目は無視されます）。")
        if any(b - a != 1 for a, b in itertools.pairwise(steps)):
            raise CheckFailed(f"報告の step が {steps} でした。step にはエポックの番号（1, 2, 3, …）を渡します。")
        running = [max(accs[: i + 1]) for i in range(len(accs))]
        if _same(reported, losses):
            raise CheckFailed("検証の損失を報告しています。最大化のスタディでは、報告する値も返す値も検証の正解率です。"
                              "損失を報告すると、枝刈りは損失の大きいトライアルを「良い」と見て、良いトライアルの"
                              "ほうを打ち切ります。")
        if _same(reported, [1 - a for a in accs]) or _same(reported, [-a for a in accs]):
            raise CheckFailed("誤り率（または符号を反転した正解率）を報告しています。スタディは最大化なので、"
                              "検証の正解率をそのまま報告します。")
        if not (_same(reported, accs) or _same(reported, running)):
            raise CheckFailed(f"報告した値 {reported} が、エポックごとの検証の正解率 {accs} と違います。 " + _OBJ_HINT)
        value = t.value
        if _close(value, accs[-1]):
            raise CheckFailed(f"最後のエポックの正解率（{accs[-1]}）を返しています。最高だったのは "
                              f"{max(accs)} です。最高のエポックの値を返します"
                              "（そのエポックの重みを保存して使う前提です）。")
        best_loss_epoch = min(range(len(losses)), key=losses.__getitem__)
        if _close(value, accs[best_loss_epoch]):
            raise CheckFailed(f"検証の損失が最小のエポックの正解率（{accs[best_loss_epoch]}）を返しています。選ぶ指標と"
                              f"返す指標をそろえ、正解率が最高のエポックの値（{max(accs)}）を返します。")
        if _close(value, min(losses)) or _close(value, 1 - max(accs)) or _close(value, -max(accs)):
            raise CheckFailed("最大化のスタディに、小さいほど良い値（損失や誤り率）を返しています。"
                              "検証の正解率を返します。")
        if not _close(value, max(accs)):
            raise CheckFailed(f"返した値 {value} が、全エポックで最高の検証の正解率 {max(accs)} と違います。 "
                              + _OBJ_HINT)


def _close(a, b) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) < 1e-6


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(_close(a, b) for a, b in zip(xs, ys, strict=True))


@objective_ex.test("どのエポックでも劣るトライアルは枝刈りされ（TrialPruned を送出）、そこで学習をやめる")
def _(answer, reference):
    import optuna

    good = [_run(0.0), _run(0.01), _run(-0.01), _run(0.005)]
    bad = [(a - 0.3, l_ + 0.5) for a, l_ in _run(0.0)]            # lower accuracy and higher loss at every epoch
    stub = _StubTraining([*good, bad])
    study = _optimize(answer, stub, n_trials=5,
                      pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1))
    last = study.trials[-1]
    if any(t.state.name != "COMPLETE" for t in study.trials[:4]):
        raise CheckFailed("良いトライアルが枝刈りされました。報告する値が大きいほど良い値（正解率）になっているかを"
                          "確かめてください。")
    if last.state.name == "COMPLETE":
        reported = _intermediate(last)
        if len(reported) > 2 and all(_close(v, 1.0) or v > 0.9 for v in reported):
            raise CheckFailed("報告した値が劣るトライアルを見分けられません。 " + _OBJ_HINT)
        raise CheckFailed("どのエポックでも正解率が低いトライアルが、枝刈りされずに最後まで学習しました。"
                          "trial.report の直後に trial.should_prune() を調べ、True なら raise optuna.TrialPruned() で"
                          "トライアルを打ち切ります（return や break では COMPLETE として記録されます）。")
    if last.state.name != "PRUNED":
        raise CheckFailed(f"劣るトライアルの状態が {last.state.name} でした。枝刈りは raise optuna.TrialPruned() で"
                          "伝えます。")
    if stub.consumed[-1] > len(last.intermediate_values):
        raise CheckFailed(f"枝刈りされたのに、train_fn のエポックを {stub.consumed[-1]} 回分取り出しています"
                          f"（報告は {len(last.intermediate_values)} 回）。"
                          "すべてのエポックを先に計算してから報告すると、"
                          "枝刈りしても計算は減りません。1 エポックごとに取り出し、報告し、判定します。")
    if len(last.intermediate_values) > 3:
        raise CheckFailed("枝刈りの判定が遅すぎます。報告のたびに trial.should_prune() を調べます。")


# =======================================================================================
# make_study

study_ex = register("make_study", "スタディを作る make_study(storage, study_name, seed, pruner)", chapter=CHAPTER,
                    reference=make_study)

_STUDY_HINT = ("optuna.create_study に storage と study_name を渡し、direction='maximize'、sampler に "
               "TPESampler(seed=seed)、pruner に渡された pruner（None なら NopPruner()）、load_if_exists=True を"
               "指定します。")


def _toy(trial):
    x = trial.suggest_float("x", -3.0, 3.0)
    kind = trial.suggest_categorical("kind", ["a", "b"])
    return -((x - 1.0) ** 2) + (0.5 if kind == "a" else 0.0)


def _make(answer, *args, **kwargs):
    with _quiet_optuna() as optuna:
        try:
            study = answer(*args, **kwargs)
        except (CheckFailed, NotImplementedError):
            raise
        except optuna.exceptions.DuplicatedStudyError:
            raise CheckFailed("同じ名前のスタディがすでにあるストレージで DuplicatedStudyError になりました。"
                              "load_if_exists=True にすると、あるときは読み込み、ないときは作ります（カーネルを"
                              "再起動しても続きから探索できます）。") from None
        except Exception as e:
            raise CheckFailed(f"make_study(...) を呼ぶと {type(e).__name__} になりました（{e}）。") from None
        if not isinstance(study, optuna.Study):
            raise CheckFailed(f"optuna.Study を返すはずですが、{type(study).__name__} が返りました。")
    return study


@study_ex.test("最大化のスタディを返し、最良のトライアルは目的関数の値が最大のもの")
def _(answer, reference):
    import optuna

    study = _make(answer, None, None, 0, None)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise CheckFailed("スタディの最適化の方向が最小化（minimize）です。create_study の既定は minimize なので、"
                          "direction='maximize' を指定しないと、正解率の最も低いトライアルが「最良」になり、"
                          "TPE も枝刈りも逆向きに働きます。")
    with _quiet_optuna():
        for v in (0.2, 0.9, 0.5):
            study.enqueue_trial({"x": v})
        study.optimize(lambda t: t.suggest_float("x", -3.0, 3.0), n_trials=3)
    if not _close(study.best_value, 0.9):
        raise CheckFailed(f"0.2, 0.9, 0.5 を返した 3 トライアルの best_value が {study.best_value} でした。")


@study_ex.test("サンプラーは TPE で、同じ seed なら同じ提案、違う seed なら違う提案になる")
def _(answer, reference):
    import optuna

    def params(seed):
        study = _make(answer, None, None, seed, None)
        if not isinstance(study.sampler, optuna.samplers.TPESampler):
            raise CheckFailed(f"サンプラーが {type(study.sampler).__name__} です。この章では TPESampler を使います。")
        with _quiet_optuna():
            study.optimize(_toy, n_trials=14)        # 10 random start-up trials, then 4 chosen by TPE
        return [t.params for t in study.trials]

    a, b, c = params(3), params(3), params(4)
    if a != b:
        raise CheckFailed("同じ seed で作った 2 つのスタディの提案が違います。TPESampler(seed=seed) のように、"
                          "seed をサンプラーに渡します（再現できない探索は比べられません）。")
    if a == c:
        raise CheckFailed("seed を変えても提案が同じです。引数の seed をサンプラーに渡してください。")


@study_ex.test("渡された pruner を使い、pruner=None なら枝刈りしない")
def _(answer, reference):
    import optuna

    class PruneAll(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    def reporting(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(1, 4):
            trial.report(0.1 if trial.number == 6 else 0.9, step)   # trial 6 is worse at every step
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    study = _make(answer, None, None, 0, PruneAll())
    with _quiet_optuna():
        study.optimize(reporting, n_trials=2)
    if any(t.state.name != "PRUNED" for t in study.trials):
        raise CheckFailed("渡した pruner（必ず枝刈りする pruner）が使われていません。create_study(pruner=pruner) と"
                          "します。")
    study = _make(answer, None, None, 0, None)
    with _quiet_optuna():
        study.optimize(reporting, n_trials=7)
    if study.trials[-1].state.name == "PRUNED":
        raise CheckFailed("pruner=None なのに、劣るトライアルが枝刈りされました。create_study の既定の pruner は "
                          "MedianPruner なので、None のときは optuna.pruners.NopPruner() を渡します。")


@study_ex.test("SQLite に保存したスタディを、同じ名前でもう一度呼ぶと続きから使える")
def _(answer, reference):
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'study.db'}"
        first = _make(answer, url, "resume-check", 0, None)
        with _quiet_optuna():
            first.optimize(_toy, n_trials=3)
        again = _make(answer, url, "resume-check", 0, None)
        n = len(again.trials)
        if n != 3:
            raise CheckFailed(f"同じストレージと名前でもう一度作ったスタディのトライアルが {n} 個でした（3 個のはず）。"
                              "storage と study_name を create_study に渡し、load_if_exists=True にします。")
        with _quiet_optuna():
            again.optimize(_toy, n_trials=2)
            names = [s.study_name for s in optuna.get_all_study_summaries(storage=url)]
            loaded = optuna.load_study(study_name="resume-check", storage=url)
            count = len(loaded.trials)
        if names != ["resume-check"] or count != 5:
            raise CheckFailed(f"ストレージにあるスタディ {names}、トライアル {count} 個（'resume-check' に 5 個の"
                              "はず）。 " + _STUDY_HINT)


# =======================================================================================
# best_so_far

best_ex = register("best_so_far", "ここまでの最良値 best_so_far(values, direction)", chapter=CHAPTER,
                   reference=best_so_far)

_BEST_HINT = ("i 番目の要素は values[0] から values[i] までの最良値（maximize なら最大、minimize なら最小）です。"
              "None や NaN（失敗・枝刈りされたトライアル）は飛ばして前の最良値を引き継ぎ、最初の有効な値より前は "
              "NaN にします。長さは values と同じです。")


def _best(answer, values, direction):
    given = list(values)
    out = call_answer(answer, given, direction)
    if len(given) != len(values) or not _same_with_nan([_nan(v) for v in given], [_nan(v) for v in values]):
        raise CheckFailed("values のリストを書き換えています（並べ替えや要素の置き換え）。"
                          "新しいリストを返してください。")
    try:
        out = [float(v) for v in out]
    except (TypeError, ValueError):
        raise CheckFailed(f"float の列を返すはずですが、{out!r} が返りました。") from None
    if len(out) != len(values):
        raise CheckFailed(f"長さ {len(values)} の values に、長さ {len(out)} のリストが返りました。None や NaN の"
                          "トライアルも 1 つと数え、前の最良値を引き継ぎます"
                          "（横軸がトライアルの番号と合わなくなります）。")
    return out


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def _same_with_nan(xs, ys) -> bool:
    return all((math.isnan(a) and math.isnan(b)) or (not math.isnan(a) and not math.isnan(b) and abs(a - b) < 1e-12)
               for a, b in zip(xs, ys, strict=True))


@best_ex.test("手で計算した例（maximize と minimize）と一致する")
def _(answer, reference):
    values = [0.3, 0.1, 0.5, 0.4, 0.7, 0.2]
    for direction, expected in (("maximize", [0.3, 0.3, 0.5, 0.5, 0.7, 0.7]),
                                ("minimize", [0.3, 0.1, 0.1, 0.1, 0.1, 0.1])):
        got = _best(answer, values, direction)
        if direction == "minimize" and _same_with_nan(got, [0.3, 0.3, 0.5, 0.5, 0.7, 0.7]):
            raise CheckFailed("direction='minimize' でも最大値を追っています。direction で最大と最小を切り替えます。")
        if got == values:
            raise CheckFailed("values をそのまま返しています。 " + _BEST_HINT)
        if not _same_with_nan(got, expected):
            raise CheckFailed(f"{direction} で {values} に対して {expected} のはずが、{got} でした。 " + _BEST_HINT)


@best_ex.test("None と NaN（失敗・枝刈りされたトライアル）を飛ばし、最初の有効な値までは NaN")
def _(answer, reference):
    nan = math.nan
    values = [None, nan, 0.4, None, 0.2, nan, 0.6]
    for direction, expected in (("maximize", [nan, nan, 0.4, 0.4, 0.4, 0.4, 0.6]),
                                ("minimize", [nan, nan, 0.4, 0.4, 0.2, 0.2, 0.2])):
        got = _best(answer, values, direction)
        if _same_with_nan(got, expected):
            continue
        if any(math.isnan(v) for v in got[2:]):
            raise CheckFailed(f"{direction}: 有効な値のあとに NaN が続いています（{got}）。np.maximum.accumulate や "
                              "max(best, v) は NaN を伝えてしまうので、NaN は比べる前に飛ばします。")
        if not math.isnan(got[0]):
            raise CheckFailed(f"{direction}: 最初の有効な値より前が {got[0]} になっています。まだ最良値がないので "
                              "NaN にします（0 にすると、グラフが 0 から始まり、minimize では最良値が 0 のまま"
                              "になります）。")
        raise CheckFailed(f"{direction} で {values} に対して {expected} のはずが、{got} でした。 " + _BEST_HINT)
    got = _best(answer, [], "maximize")
    if got:
        raise CheckFailed("空の values には空のリストを返します。")


@best_ex.test("整数や同じ値が続いても、入力のリストを書き換えない")
def _(answer, reference):
    got = _best(answer, [3, 3, 1, 5, 5, 2], "maximize")
    if not _same_with_nan(got, [3.0, 3.0, 3.0, 5.0, 5.0, 5.0]):
        raise CheckFailed(f"[3, 3, 1, 5, 5, 2] の maximize で [3, 3, 3, 5, 5, 5] のはずが {got} でした。")
