"""Wan's UniPC sampler against the exact flow-matching ODE solution of a Gaussian data distribution."""

import numpy as np
import torch

from toolkit.models.sampling import UniPC, wan_sample, wan_sigmas


class GaussianFlow(torch.nn.Module):
    """Exact flow v = ε − E[x0 | x_t] for data x0 ~ N(mu, s²) (per element), as a stand-in model.

    The flow ODE maps noise ε at σ = 1 to μ + s·ε at σ = 0 through x(σ) = (1 − σ)·μ + √((1 − σ)²s² + σ²)·ε."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, sigmas: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.s, self.sigmas = mu, s, sigmas
        self.calls = []

    def forward(self, x, t, context, step=0):
        sigma = float(self.sigmas[step])  # the model is told floor(1000 σ); use the exact σ of the step
        self.calls.append(float(t[0]))
        a = 1 - sigma
        var = a * a * self.s**2 + sigma**2
        x0 = self.mu + a * self.s**2 / var * (x.double() - a * self.mu)
        return ((x.double() - x0) / sigma).to(x.dtype)


def exact(mu, s, eps, sigma):
    return (1 - sigma) * mu + torch.sqrt((1 - sigma) ** 2 * s**2 + sigma**2) * eps


def posterior_mean(mu, s, x, sigma):
    a = 1 - sigma
    return mu + a * s**2 / (a * a * s**2 + sigma**2) * (x - a * mu)


def run(steps, solver, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, 4, 3, 5, 6, generator=g, dtype=torch.float64) * 2
    s = torch.rand(1, 4, 3, 5, 6, generator=g, dtype=torch.float64) + 0.5
    eps = torch.randn(1, 4, 3, 5, 6, generator=g, dtype=torch.float64)
    sigmas = wan_sigmas(steps, 5.0)
    model = GaussianFlow(mu, s, sigmas)
    x_start = exact(mu, s, eps, float(sigmas[0]))  # on the ODE trajectory at the first σ (0.9998)
    out = wan_sample(model, x_start, None, steps=steps, solver=solver).double()
    # Wan's schedule ends with a jump from the last σ > 0 straight to σ = 0, i.e. to the x0 estimate there; the
    # exact counterpart is the posterior mean at the exact ODE state of that σ. The error is the integration error.
    sigma_last = float(sigmas[-2])
    target = posterior_mean(mu, s, exact(mu, s, eps, sigma_last), sigma_last)
    err = (out - target).norm() / (target - mu).norm()
    return float(err), model.calls


def test_schedule_matches_wan_defaults():
    sig = wan_sigmas(50, 5.0)
    assert len(sig) == 51 and sig[-1] == 0
    assert abs(float(sig[0]) - 5 * 0.999 / (1 + 4 * 0.999)) < 1e-7  # float32 values, from float32(0.999)
    assert torch.all(sig[1:] < sig[:-1])


def _wan_reference_schedule(steps: int, shift: float) -> tuple[list[int], np.ndarray]:
    """Wan2.1's FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1).set_timesteps(steps, shift=shift),
    written out step by step from its published algorithm: a float32 training table 1 − linspace(1, 1/1000)[::-1],
    σ_max = its first entry, np.linspace(σ_max, σ_min, steps + 1)[:-1], the shift in float64, timesteps
    σ·1000 cast to int64, sigmas (with a final 0) cast to float32."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    table = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * 1000).to(torch.int64).tolist()
    return timesteps, np.concatenate([sigmas, [0]]).astype(np.float32)


def test_wan_schedule_equals_wans_scheduler_over_steps_and_shifts():
    """Every (steps, shift) of a sweep: the integer timesteps the model sees and the solver's sigmas are Wan's,
    exactly. (With σ_max = 0.999 in float64 the timesteps differed by one in 27 of these combinations, e.g. 3
    steps at shift 1: 665 where Wan has 666.)"""
    from toolkit.models.sampling import wan_model_timesteps

    differs_before = 0
    for steps in range(1, 101):
        for shift in (1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 12.0, 16.0, 17.0, 0.5, 7.5):
            timesteps, sigmas = _wan_reference_schedule(steps, shift)
            assert wan_model_timesteps(steps, shift) == [float(t) for t in timesteps], (steps, shift)
            assert np.array_equal(wan_sigmas(steps, shift).numpy(), sigmas.astype(np.float64)), (steps, shift)
            old = torch.linspace(0.999, 0.0, steps + 1, dtype=torch.float64)[:-1]
            old = [float(int(x)) for x in (1000 * shift * old / (1 + (shift - 1) * old))]
            differs_before += old != [float(t) for t in timesteps]
    assert differs_before > 0  # the sweep covers the cases the float64 σ_max got wrong


def test_unipc_beats_euler_and_converges():
    """Integration error on an exactly solvable flow. (Measured: UniPC 4-12x below Euler at 10-40 steps.)"""
    err = {(n, solver): run(n, solver)[0] for n in (10, 20, 40, 80) for solver in ("unipc", "euler")}
    assert run(10, "unipc")[1][0] == 999.0  # integer timesteps as Wan: floor(1000 * 0.99980)
    for n in (10, 20, 40):
        assert err[n, "unipc"] < err[n, "euler"] / 3
    assert err[80, "euler"] < err[20, "euler"] / 2
    assert err[80, "unipc"] < err[20, "unipc"] / 2 and err[80, "unipc"] < 0.01


def test_unipc_final_step_returns_the_x0_estimate():
    sig = wan_sigmas(3, 5.0)
    solver = UniPC(sig)
    x = torch.randn(2, 3)
    flows = [torch.randn(2, 3) for _ in range(3)]
    for i in range(2):
        x = solver.step(i, x, flows[i])
    last = solver.step(2, x, flows[2])
    # At σ_next = 0 the predictor is first order and returns the corrected sample's x0 estimate.
    torch.testing.assert_close(last, x.float() - float(sig[2]) * flows[2])


def test_unipc_matches_diffusers_flow_unipc_step_by_step():
    """Same sigmas, same model outputs -> same samples as diffusers' UniPC with flow sigmas (Wan's pipelines)."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    steps = 12
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=5.0, num_train_timesteps=1000)
    sched.set_timesteps(steps)
    # diffusers spaces its flow sigmas slightly differently from Wan's original scheduler (<= 0.003): this test
    # checks the solver, so both run on diffusers' sigmas.
    assert (sched.sigmas.double() - wan_sigmas(steps, 5.0)).abs().max() < 5e-3
    ours = UniPC(sched.sigmas.double())
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 3, 4, 5, generator=g)
    for i, t in enumerate(sched.timesteps):
        flow = torch.randn(2, 3, 4, 5, generator=g) + 0.1 * x_ours  # any model output works for this check
        x_ref = sched.step(flow, t, x_ref).prev_sample
        x_ours = ours.step(i, x_ours, flow)
        torch.testing.assert_close(x_ours, x_ref, rtol=2e-4, atol=2e-4)
