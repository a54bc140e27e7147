# usage: python3 scripts/gpu/nvrtc_kernels.py FIXTURE_DIR   (from the repository root, on the GPU machine)
# Compiles rmlx's CUDA kernel sources with NVRTC as MLX's cuda_kernel does (no
# std headers; the body inside a function whose template constants are
# constexpr), without MLX: PyTorch allocates and the driver API launches.
# Checks:
#  - rotated_encode.cu against the composed encode on the CPU (fixtures from
#    `cargo run -p rmlx-kv-quant --example encode_fixtures -- FIXTURE_DIR`):
#    codes, norms, QJL signs and residual norms;
#  - the fp8 prelude's e4m3_float (lib.rs's CUDA header) on all 256 bytes
#    against torch.float8_e4m3fn;
#  - paged_decode.cu with the fp8 prelude against attention in torch.
import ctypes, glob, os, re, sys
import numpy as np
import torch

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
here = sys.argv[1]

def find(names):
    pats = []
    for n in names:
        pats += glob.glob(f"/usr/local/cuda*/lib64/{n}*") + glob.glob(f"/usr/lib/x86_64-linux-gnu/{n}*")
        for sp in sys.path:
            pats += glob.glob(f"{sp}/nvidia/*/lib/{n}*")
    pats = [p for p in pats if os.path.isfile(p)]
    if not pats:
        raise SystemExit(f"no {names}")
    return sorted(pats)[-1]

nvrtc = ctypes.CDLL(find(["libnvrtc.so"]))
cuda = ctypes.CDLL("libcuda.so.1")
print("nvrtc:", nvrtc._name)
torch.zeros(1, device="cuda")
assert cuda.cuInit(0) == 0

BF16 = "struct __nv_bfloat16 { unsigned short x; __device__ operator float() const { return __uint_as_float(((unsigned)x) << 16); } };\n"
STUB = "typedef unsigned int uint32_t;\ntypedef long long int64_t;\ntypedef unsigned char uint8_t;\n"

def compile_kernel(src, name="k"):
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None)
    assert rc == 0, rc
    maj, mnr = torch.cuda.get_device_capability()
    opts = [b"--device-as-default-execution-space", f"--gpu-architecture=compute_{maj}{mnr}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        print(src)
        raise SystemExit("NVRTC failed:\n" + log.value.decode())
    if log.value.strip():
        print("NVRTC log:", log.value.decode()[:2000])
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    mod = ctypes.c_void_p()
    assert cuda.cuModuleLoadData(ctypes.byref(mod), ptx) == 0
    fn = ctypes.c_void_p()
    assert cuda.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()) == 0
    return fn

def launch(fn, grid, block, tensors):
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
    params = (ctypes.c_void_p * len(ptrs))(*[ctypes.addressof(p) for p in ptrs])
    rc = cuda.cuLaunchKernel(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0, None, params, None)
    assert rc == 0, rc
    torch.cuda.synchronize()

def ctype(t):
    return {torch.float32: "float", torch.uint32: "uint32_t", torch.int32: "int", torch.uint8: "uint8_t",
            torch.bool: "bool", torch.bfloat16: "__nv_bfloat16"}[t.dtype]

def build(body, inputs, outputs, consts, header=""):
    sig = ",\n".join([f"const {ctype(t)}* {n}" for n, t in inputs] + [f"{t}* {n}" for n, t in outputs])
    cs = "".join(f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};\n" for k, v in consts)
    return STUB + header + f'extern "C" __global__ void k(\n{sig}) {{\n{cs}\n{body}\n}}\n'

def unpack(words, bits, d):
    w = (d + 31) // 32
    words = words.reshape(-1, bits, w).astype(np.uint64)
    out = np.zeros((words.shape[0], w * 32), np.int64)
    for j in range(bits):
        for wi in range(w):
            for b in range(32):
                out[:, 32 * wi + b] |= (((words[:, j, wi] >> b) & 1).astype(np.int64) << j)
    return out[:, :d]

def rd(p, dt):
    return np.fromfile(p, dtype=dt)

body = open(f"{root}/kernels/attn/src/rotated_encode.cu").read()
ok = True
for line in open(f"{here}/cases.txt"):
    i, name, n, k, d, bits, g, kind, bn, bg, qjl, pres = line.split()
    i, n, k, d, bits, g, kind, bn, bg, qjl, pres = map(int, [i, n, k, d, bits, g, kind, bn, bg, qjl, pres])
    pre = f"{here}/c{i}"
    ins = [(nm, torch.from_numpy(rd(f"{pre}_{nm}.bin", np.float32)).cuda()) for nm in ["x", "rot", "cb", "params", "s"]]
    w = (d + 31) // 32
    wc, ng = bits * w, d // g
    tot = wc + ng + (w + 1 if qjl else 0)
    out = torch.zeros(n * k * tot, dtype=torch.int32, device="cuda")
    consts = [("D", d), ("BITS", bits), ("G", g), ("ROT", kind), ("BN", bn), ("BG", bg), ("QJL", bool(qjl)), ("PRESERVE", bool(pres))]
    fn = compile_kernel(build(body, ins, [("out", "uint32_t")], consts))
    launch(fn, (n * k, 1, 1), (32, 1, 1), [t for _, t in ins] + [out])
    o = out.cpu().numpy().view(np.uint32).reshape(n * k, tot)
    want_codes = rd(f"{pre}_out0.bin", np.uint32).reshape(n * k, wc)
    want_norms = rd(f"{pre}_out1.bin", np.float32).reshape(n * k, ng)
    cf, cr = unpack(o[:, :wc], bits, d), unpack(want_codes, bits, d)
    mism = int((cf != cr).sum()); step = int(np.abs(cf - cr).max())
    words_eq = bool((o[:, :wc] == want_codes).all())
    nf = o[:, wc:wc + ng].copy().view(np.float32)
    nrel = float((np.abs(nf - want_norms) / (np.abs(want_norms) + 1e-6)).max())
    msg = f"{name:10} d={d:3} codes {mism}/{cf.size} differ (step {step}, words equal {words_eq}), norms rel {nrel:.2e}"
    bad = step > 1 or mism > max(2, 0.01 * cf.size) or not nrel <= 5e-2
    if qjl:
        sf = unpack(o[:, wc + ng:wc + ng + w], 1, d)
        sr = unpack(rd(f"{pre}_out2.bin", np.uint32).reshape(n * k, w), 1, d)
        rf = o[:, wc + ng + w].copy().view(np.float32)
        rr = rd(f"{pre}_out3.bin", np.float32)
        sm = int((sf != sr).sum()); rrel = float((np.abs(rf - rr) / (np.abs(rr) + 1e-6)).max())
        msg += f", QJL signs {sm}/{sf.size} differ, ||r|| rel {rrel:.2e}"
        bad = bad or sm > max(2, 0.01 * sf.size) or not rrel <= 5e-2
    if i == 0:
        # time of one launch (87 vectors: about one decode step's keys at 8 streams x 8 kv heads + 23)
        args = [t for _, t in ins] + [out]
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(200):
            ptrs = [ctypes.c_void_p(t.data_ptr()) for t in args]
            prm = (ctypes.c_void_p * len(ptrs))(*[ctypes.addressof(p) for p in ptrs])
            cuda.cuLaunchKernel(fn, n * k, 1, 1, 32, 1, 1, 0, None, prm, None)
        e1.record()
        torch.cuda.synchronize()
        msg += f", {e0.elapsed_time(e1) / 200 * 1000:.1f} us per launch"
    print(("FAIL " if bad else "ok   ") + msg)
    ok = ok and not bad

# fp8: the e4m3 helper of lib.rs's CUDA header against torch's float8_e4m3fn
lib = open(f"{root}/kernels/attn/src/lib.rs").read()
hdr = re.search(r'const CUDA_HEADER: &str = "(.*?)";', lib, re.S).group(1)
src = STUB + hdr + 'extern "C" __global__ void k(const uint8_t* b, float* out) { out[threadIdx.x] = e4m3_float(b[threadIdx.x]); }\n'
fn = compile_kernel(src)
b = torch.arange(256, dtype=torch.int32).to(torch.uint8).cuda()
o = torch.zeros(256, dtype=torch.float32, device="cuda")
launch(fn, (1, 1, 1), (256, 1, 1), [b, o])
ref = b.view(torch.float8_e4m3fn).float()
same = torch.equal(torch.nan_to_num(o, nan=12345.0), torch.nan_to_num(ref, nan=12345.0))
print(("ok   " if same else "FAIL ") + f"e4m3_float over all 256 bytes equals torch float8_e4m3fn: {same}")
ok = ok and same

# fp8 paged decode: the Fp8 prelude + paged_decode.cu against a torch reference
pd = open(f"{root}/kernels/attn/src/paged_decode.cu").read()
pre = re.search(r'Family::Fp8 => concat!\((.*?)\),', lib, re.S).group(1)
prelude = "".join(bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'"((?:[^"\\]|\\.)*)"', pre))
B, H, K, D, BS, S = 3, 8, 2, 128, 16, 24 * 16
torch.manual_seed(0)
q = torch.randn(B, H, D, device="cuda")
kx, vx = torch.randn(S, K, D, device="cuda") * 3, torch.randn(S, K, D, device="cuda")
def enc(x):
    sc = (x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448).to(torch.bfloat16)
    return (x / sc.float()).to(torch.float8_e4m3fn).view(torch.uint8), sc.squeeze(-1)
kc, ks = enc(kx); vc, vs = enc(vx)
tables = torch.tensor([[7, 2, 19, 11], [4, 9, 0, 0], [23, 0, 0, 0]], dtype=torch.int32, device="cuda")
lens = [61, 20, 9]; ctx = 64
valid = torch.zeros(B, ctx, dtype=torch.bool, device="cuda")
for r, L in enumerate(lens): valid[r, :L] = True
params = torch.tensor([D ** -0.5, 0.0], device="cuda")
sinks = torch.zeros(H, device="cuda")
tshape = torch.tensor([B, 4], dtype=torch.int32, device="cuda")
vshape = torch.tensor([B, ctx], dtype=torch.int32, device="cuda")
ins = [("q", q), ("kc", kc), ("ks", ks), ("vc", vc), ("vs", vs), ("tables", tables), ("tables_shape", tshape), ("valid", valid), ("valid_shape", vshape), ("params", params), ("sinks", sinks)]
out = torch.zeros(B, H, D, device="cuda")
consts = [("D", D), ("H", H), ("K", K), ("BS", BS), ("HAS_SINKS", False), ("SOFTCAP", False)]
src = build(prelude + pd, ins, [("out", "float")], consts, header=BF16 + hdr)
fn = compile_kernel(src)
launch(fn, (1, H, B), (128, 1, 1), [t for _, t in ins] + [out])
kd = kc.view(torch.float8_e4m3fn).float() * ks.float()[..., None]
vd = vc.view(torch.float8_e4m3fn).float() * vs.float()[..., None]
ref = torch.zeros_like(out)
for r in range(B):
    slots = torch.cat([tables[r, j] * BS + torch.arange(BS, device="cuda") for j in range(4)])[: lens[r]]
    kk, vv = kd[slots], vd[slots]  # [T, K, D]
    for h in range(H):
        kvh = h // (H // K)
        p = torch.softmax((kk[:, kvh] @ q[r, h]) * D ** -0.5, 0)
        ref[r, h] = p @ vv[:, kvh]
err = float((out - ref).abs().max())
print(("ok   " if err < 1e-4 else "FAIL ") + f"fp8 paged decode max |kernel - torch| = {err:.2e}")
ok = ok and err < 1e-4
print("ALL OK" if ok else "SOME FAILED")
