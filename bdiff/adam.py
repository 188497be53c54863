"""Adam (Kingma & Ba 2015) for the trainer: the arithmetic of torch.optim.Adam's default
single-tensor path, operation for operation.

Written here rather than imported: every torch.optim optimiser imports torch._dynamo on first
use (its __init__ and step are wrapped to keep the compiler out), 2.2 s of each `bdiff fit` on a
slow 2-core machine, where fitting 10 000 2-D rows has 60 s (NOTES.md).
tests/test_trainer.py checks it against torch.optim.Adam to the bit. Its state keeps torch's
names per parameter index (step, exp_avg, exp_avg_sq), so checkpoints written with
torch.optim.Adam resume unchanged.
"""
import torch


class Adam:
    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.state = {}  # parameter index -> {"step", "exp_avg", "exp_avg_sq"}, from its first gradient

    def zero_grad(self):
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self):
        """One update of every parameter with a gradient. The same element operations as
        torch's single-tensor path, each applied to a list of tensors in one call: per tensor
        and operation from Python, the update was 2 ms of every 23 ms training step on a slow
        2-core machine (16 small tensors, 7 operations each; NOTES.md)."""
        beta1, beta2 = self.betas
        by_step = {}  # parameters that missed a step (no gradient then) count their own steps
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            state = self.state.get(index)
            if state is None:
                state = self.state[index] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                             "exp_avg_sq": torch.zeros_like(param)}
            state["step"] += 1
            by_step.setdefault(state["step"].item(), []).append((param, state))
        for step, group in by_step.items():
            params = [param for param, _ in group]
            grads = [param.grad for param in params]
            exp_avgs = [state["exp_avg"] for _, state in group]
            exp_avg_sqs = [state["exp_avg_sq"] for _, state in group]
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denoms, (1 - beta2**step) ** 0.5)
            torch._foreach_add_(denoms, self.eps)
            torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-(self.lr / (1 - beta1**step)))

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        """state: parameter index -> its tensors, as state_dict() gives them (or a checkpoint holds
        them); moved to each parameter's device and dtype, the step count kept on the CPU."""
        self.state = {}
        for index, tensors in state.items():
            param = self.params[int(index)] if 0 <= int(index) < len(self.params) else None
            if param is None or any(tensors[name].shape != param.shape for name in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"the optimiser state of parameter {index} does not fit the model")
            self.state[int(index)] = {"step": tensors["step"].detach().to("cpu", torch.float32).clone(),
                                      "exp_avg": tensors["exp_avg"].detach().to(param).clone(),
                                      "exp_avg_sq": tensors["exp_avg_sq"].detach().to(param).clone()}
