"""Ahead-of-time compile of every Triton kernel configuration the dispatch can launch, for
sm_80 and sm_90, without a GPU; registers, shared memory and spills read with the
cuobjdump that ships with Triton."""
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

INT_ARGS = {"B", "M", "M_PAD", "D", "n_elem", "stride_x", "stride_y", "seed", "first_elem", "first_row",
            "split_len"}
FLOAT_ARGS = {"h", "sqrt_h", "delta", "inv_eps", "log2_norm", "s_floor"}
CAPABILITIES = (80, 90)


def launch_configurations():
    """(kernel name, constexprs, num_warps) for every launch the dispatch can make."""
    from bdiff.kernels.triton_field import ROWS_BLOCKS, ROWS_WARPS, TILES_BLOCKS, TILES_WARPS
    from bdiff.kernels.triton_sde import SDE_BLOCK
    configs = []
    for exclude in (False, True):
        for block_d in (1, 2, 4, 8):
            configs.append(("field_rows_kernel", dict(ROWS_BLOCKS, HAS_EXCLUDE=exclude, BLOCK_D=block_d),
                            ROWS_WARPS))
        configs.append(("field_tiles_kernel", dict(TILES_BLOCKS, HAS_EXCLUDE=exclude, PRECISION="ieee"),
                        TILES_WARPS))
    for precond in (False, True):
        configs.append(("sde_step_kernel", dict(PRECOND=precond, BLOCK=SDE_BLOCK), 4))
        for block_d in (1, 2, 4, 8):
            configs.append(("oracle_sde_step_kernel", dict(ROWS_BLOCKS, PRECOND=precond, BLOCK_D=block_d),
                            ROWS_WARPS))
    return configs


def _kernel(name):
    from bdiff.kernels import triton_field, triton_sde
    return getattr(triton_field, name, None) or getattr(triton_sde, name)


def _signature(kernel):
    sig = {}
    for param in kernel.params:
        if param.is_constexpr:
            sig[param.name] = "constexpr"
        elif param.name == "excl_ptr":  # 32-bit reference indices (kernels.triton_field._exclusions)
            sig[param.name] = "*i32"
        elif param.name.endswith("_ptr"):
            sig[param.name] = "*fp32"
        elif param.name in INT_ARGS:
            sig[param.name] = "i32"
        elif param.name in FLOAT_ARGS:
            sig[param.name] = "fp32"
        else:
            raise ValueError(f"no type for argument {param.name}")
    return sig


# Integers that are multiples of 16 in every launch (the padded reference count and its shares)
ALIGNED_INTS = {"M_PAD", "split_len"}


def _launch_attrs(kernel):
    """The specialisation real launches get: Triton marks 16-byte-aligned pointers (every
    PyTorch allocation) and integers divisible by 16 with tt.divisibility, which lets it
    vectorise loads; without these hints the compile would describe a kernel that never runs."""
    return {(i,): [["tt.divisibility", 16]] for i, param in enumerate(kernel.params)
            if not param.is_constexpr and (param.name.endswith("_ptr") or param.name in ALIGNED_INTS)}


def compile_one(name, constexprs, num_warps, capability):
    """Compile one configuration; returns registers, stack, shared and local bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses
    from triton.compiler import ASTSource
    kernel = _kernel(name)
    source = ASTSource(fn=kernel, signature=_signature(kernel), constexprs=constexprs,
                       attrs=_launch_attrs(kernel))
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin, \
            tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as ptx:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = _run(os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name)
        loop = reference_loop(_run(os.path.join(tools, "cuobjdump"), "-sass", cubin.name))
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        # ptxas -v separates real register spills from other stack use (libdevice's cosf
        # slow path, reached through tl.randn, keeps a small scratch array on the stack)
        arch = re.search(r"^\.target\s+(sm_\w+)", compiled.asm["ptx"], re.M).group(1)  # sm_90a
        # the flags Triton's own make_cubin passes, so the log describes the cubin above
        verbose = _run(get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                       f"--gpu-name={arch}", ptx.name, "-o", os.devnull)
    regs, stack, shared, local = map(int, re.search(
        r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage).groups())
    spill_stores, spill_loads = map(int, re.search(
        r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose).groups())
    return {"kernel": name, "sm": capability, "num_warps": num_warps, "config": dict(constexprs),
            "not_specialised": [p.name for p in kernel.params if p.do_not_specialize],
            "registers": regs, "stack_bytes": stack, "local_bytes": local,
            "shared_bytes": shared + compiled.metadata.shared, "spill_store_bytes": spill_stores,
            "spill_load_bytes": spill_loads, "spills": spill_stores + spill_loads + local > 0,
            **per_pair(loop, constexprs, num_warps)}


SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", re.M)


def reference_loop(sass):
    """(instructions, shuffles) in the body of the kernel's outermost loop, the one over tiles
    of references: the span of its widest backward branch. (0, 0) for a kernel without a loop."""
    lines = [(int(address, 16), opcode, operands) for address, opcode, operands in SASS_LINE.findall(sass)]
    spans = [(int(operands.split()[0], 16), address) for address, opcode, operands in lines
             if opcode == "BRA" and operands.strip().startswith("0x") and int(operands.split()[0], 16) < address]
    if not spans:
        return 0, 0
    start, end = max(spans, key=lambda span: span[1] - span[0])
    body = [opcode for address, opcode, _ in lines if start <= address <= end]
    return len(body), sum(opcode.startswith("SHFL") for opcode in body)


def per_pair(loop, constexprs, num_warps):
    """Loop-body instructions and shuffles per (query, reference) pair: every thread runs the body
    once per tile of BLOCK_B x BLOCK_M pairs, so the body times the threads over the pairs."""
    instructions, shuffles = loop
    if "BLOCK_M" not in constexprs or not instructions:
        return {"loop_instructions": instructions, "instructions_per_pair": None, "shuffles_per_pair": None}
    threads_per_pair = 32 * num_warps / (constexprs["BLOCK_B"] * constexprs["BLOCK_M"])
    return {"loop_instructions": instructions, "instructions_per_pair": instructions * threads_per_pair,
            "shuffles_per_pair": shuffles * threads_per_pair}


def _run(*command):
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return result.stdout + result.stderr


def _compile_args(args):
    return compile_one(*args)


def _compiler_process():
    # The interpreter replaces @triton.jit functions; compiling needs the real ones.
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(capabilities=CAPABILITIES, workers=2):
    """Compile every configuration for every capability, in fresh `workers` processes (so the
    check also works from a process running the Triton interpreter)."""
    jobs = [(name, consts, warps, cap) for cap in capabilities
            for name, consts, warps in launch_configurations()]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_compiler_process) as pool:
        return list(pool.map(_compile_args, jobs))
