#include "CGNetModel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace OpenMMFlowMatch {

namespace {

// Four doubles (one AVX register; two SSE2 registers when compiled without AVX). GCC/Clang
// vector extension: element-wise arithmetic, a scalar operand is broadcast.
typedef double v4d __attribute__((vector_size(32)));

const int LANES = 8;     // padded vector lengths are multiples of this (two v4d)
const int ALIGNMENT = 64;

int padded(int n) {
    return ((n + LANES - 1) / LANES) * LANES;
}

double* alignedZeros(size_t count) {
    void* memory = nullptr;
    size_t bytes = ((count * sizeof(double) + ALIGNMENT - 1) / ALIGNMENT) * ALIGNMENT;
    if (bytes == 0)
        bytes = ALIGNMENT;
    if (posix_memalign(&memory, ALIGNMENT, bytes) != 0)
        throw std::bad_alloc();
    std::memset(memory, 0, bytes);
    return static_cast<double*>(memory);
}

inline v4d load(const double* p) {
    return *reinterpret_cast<const v4d*>(p);
}
inline void store(double* p, v4d value) {
    *reinterpret_cast<v4d*>(p) = value;
}

/*
 * Y[b][c0:c0+4*CW] = init[b][...] + sum_{r < rows} X[b][r] * M[r][c0:c0+4*CW] for the NB (1..4) copies b.
 * M is rows x cols, row-major, 32-byte aligned rows. init may be null (0); initStride 0 broadcasts
 * one init row (a bias) to every b. Register-blocked: NB copies x CW vectors of 4 outputs =
 * NB*CW independent vector accumulators (8 or more hide the latency of the multiply-adds: with
 * one copy, 2 accumulators left the loop latency-bound at a quarter of the machine's throughput),
 * each weight vector loaded once for all copies. Every output is summed over r in order (no
 * reassociation, so results do not depend on the blocking).
 */
template <int NB, int CW>
inline void blockMatVecChunk(int c0, int rows, int cols, const double* __restrict M, const double* __restrict X,
                             int ldx, const double* init, int initStride, double* Y, int ldy) {
    v4d acc[NB][CW];
    for (int b = 0; b < NB; b++)
        for (int v = 0; v < CW; v++)
            acc[b][v] = init != nullptr ? load(init + b * initStride + c0 + 4 * v) : v4d{0.0, 0.0, 0.0, 0.0};
    const double* column = M + c0;
    for (int r = 0; r < rows; r++) {
        const double* row = column + (size_t) r * cols;
        v4d w[CW];
        for (int v = 0; v < CW; v++)
            w[v] = load(row + 4 * v);
        for (int b = 0; b < NB; b++) {
            const double x = X[b * ldx + r];
            for (int v = 0; v < CW; v++)
                acc[b][v] += x * w[v];
        }
    }
    for (int b = 0; b < NB; b++)
        for (int v = 0; v < CW; v++)
            store(Y + b * ldy + c0 + 4 * v, acc[b][v]);
}

/* All cols (a multiple of LANES) in chunks of 4*CW columns, the remainder in chunks of LANES. */
template <int NB, int CW>
void blockMatVecN(int rows, int cols, const double* __restrict M, const double* __restrict X, int ldx,
                  const double* init, int initStride, double* Y, int ldy) {
    int c = 0;
    for (; c + 4 * CW <= cols; c += 4 * CW)
        blockMatVecChunk<NB, CW>(c, rows, cols, M, X, ldx, init, initStride, Y, ldy);
    for (; c < cols; c += LANES)
        blockMatVecChunk<NB, 2>(c, rows, cols, M, X, ldx, init, initStride, Y, ldy);
}

void blockMatVec(int count, int rows, int cols, const double* M, const double* X, int ldx, const double* init,
                 int initStride, double* Y, int ldy) {
    static_assert(CGNetModel::BLOCK == 4, "blockMatVec dispatches blocks of up to 4 copies");
    switch (count) {
        case 1: blockMatVecN<1, 8>(rows, cols, M, X, ldx, init, initStride, Y, ldy); break;
        case 2: blockMatVecN<2, 4>(rows, cols, M, X, ldx, init, initStride, Y, ldy); break;
        case 3: blockMatVecN<3, 2>(rows, cols, M, X, ldx, init, initStride, Y, ldy); break;
        default: blockMatVecN<4, 2>(rows, cols, M, X, ldx, init, initStride, Y, ldy); break;
    }
}

/*
 * Transposed product by dot products over the rows of the same matrix:
 * Y[b][j] = init[b][j] + sum_{i < cols} M[j][i] * G[b][i] for j < rows, the NB (1..4) copies b.
 * Used for the backward pass, so that one copy of each weight matrix serves both directions
 * (with a second, transposed copy the weights of the default network, 1.7 MB, did not fit in a
 * 1 MB L2 cache and every step streamed them from L3). M is rows x cols (cols a multiple of 8),
 * read row by row, contiguously; RB rows x NB copies x 2 vector accumulators, summed
 * horizontally at the end. rows must be a multiple of RB. init may alias Y.
 */
template <int NB, int RB>
void blockMatTVecN(int rows, int cols, const double* __restrict M, const double* __restrict G, int ldg,
                   const double* init, int ldi, double* Y, int ldy) {
    for (int j = 0; j < rows; j += RB) {
        v4d acc[NB][RB][2];
        for (int b = 0; b < NB; b++)
            for (int k = 0; k < RB; k++)
                acc[b][k][0] = acc[b][k][1] = v4d{0.0, 0.0, 0.0, 0.0};
        for (int i = 0; i < cols; i += LANES) {
            v4d w[RB][2];
            for (int k = 0; k < RB; k++) {
                w[k][0] = load(M + (size_t) (j + k) * cols + i);
                w[k][1] = load(M + (size_t) (j + k) * cols + i + 4);
            }
            for (int b = 0; b < NB; b++) {
                const v4d g0 = load(G + b * ldg + i), g1 = load(G + b * ldg + i + 4);
                for (int k = 0; k < RB; k++) {
                    acc[b][k][0] += w[k][0] * g0;
                    acc[b][k][1] += w[k][1] * g1;
                }
            }
        }
        for (int b = 0; b < NB; b++)
            for (int k = 0; k < RB; k++) {
                const v4d a = acc[b][k][0] + acc[b][k][1];
                const double sum = (a[0] + a[1]) + (a[2] + a[3]);
                Y[b * ldy + j + k] = (init != nullptr ? init[b * ldi + j + k] : 0.0) + sum;
            }
    }
}

void blockMatTVec(int count, int rows, int cols, const double* M, const double* G, int ldg, const double* init, int ldi,
                  double* Y, int ldy) {
#ifdef __AVX512VL__
    const int wide = 2;  // 32 vector registers: 2 rows x 4 copies x 2 accumulators fit
#else
    const int wide = 1;
#endif
    switch (count) {  // rows is a multiple of LANES (8)
        case 1: blockMatTVecN<1, 4>(rows, cols, M, G, ldg, init, ldi, Y, ldy); break;
        case 2: blockMatTVecN<2, 2>(rows, cols, M, G, ldg, init, ldi, Y, ldy); break;
        case 3:
            if (wide == 2)
                blockMatTVecN<3, 2>(rows, cols, M, G, ldg, init, ldi, Y, ldy);
            else
                blockMatTVecN<3, 1>(rows, cols, M, G, ldg, init, ldi, Y, ldy);
            break;
        default:
            if (wide == 2)
                blockMatTVecN<4, 2>(rows, cols, M, G, ldg, init, ldi, Y, ldy);
            else
                blockMatTVecN<4, 1>(rows, cols, M, G, ldg, init, ldi, Y, ldy);
            break;
    }
}

inline void sub(const double* a, const double* b, double* out) {
    out[0] = a[0] - b[0];
    out[1] = a[1] - b[1];
    out[2] = a[2] - b[2];
}
inline double dot(const double* a, const double* b) {
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}
inline void cross(const double* a, const double* b, double* out) {
    out[0] = a[1] * b[2] - a[2] * b[1];
    out[1] = a[2] * b[0] - a[0] * b[2];
    out[2] = a[0] * b[1] - a[1] * b[0];
}
inline void axpy(double s, const double* v, double* out) {
    out[0] += s * v[0];
    out[1] += s * v[1];
    out[2] += s * v[2];
}

// Constants of openmm_flowmatch.forcefield.features.InvariantFeatures.raw
const double ANGLE_EPSILON = 1e-20;     // sqrt(|u x v|^2 + 1e-20)
const double DIHEDRAL_EPSILON = 1e-30;  // sqrt(x^2 + y^2 + 1e-30)
const double SOFTPLUS_THRESHOLD = 20.0; // torch.nn.Softplus default (beta = 1)

}  // namespace

Activation activationFromName(const std::string& name) {
    std::string lower;
    for (char c : name)
        lower += (char) std::tolower((unsigned char) c);
    if (lower == "tanh")
        return Activation::Tanh;
    if (lower == "silu")
        return Activation::SiLU;
    if (lower == "softplus")
        return Activation::Softplus;
    throw std::invalid_argument("CGNetForce: unsupported activation '" + name + "' (supported: tanh, silu, softplus)");
}

std::string activationName(Activation activation) {
    switch (activation) {
        case Activation::Tanh: return "tanh";
        case Activation::SiLU: return "silu";
        case Activation::Softplus: return "softplus";
    }
    return "unknown";
}

void CGNetParameters::validate() const {
    auto fail = [](const std::string& message) { throw std::invalid_argument("CGNetForce: " + message); };
    if (numBeads < 2)
        fail("needs at least 2 beads");
    if (bondIndex.size() % 2 || angleIndex.size() % 3 || dihedralIndex.size() % 4 || pairIndex.size() % 2)
        fail("feature index tables have the wrong length");
    for (const std::vector<int>* table : {&bondIndex, &angleIndex, &dihedralIndex, &pairIndex})
        for (int index : *table)
            if (index < 0 || index >= numBeads)
                fail("feature index out of range");
    int features = numFeatures();
    if (features == 0)
        fail("the network has no features");
    if ((int) mean.size() != features || (int) stddev.size() != features)
        fail("mean/std need one entry per feature");
    for (double s : stddev)
        if (!(s > 0))
            fail("feature standard deviations must be positive");
    if (layers.size() < 2)
        fail("needs an input and an output layer");
    int width = layers[0].rows;
    for (size_t l = 0; l < layers.size(); l++) {
        const LinearLayer& layer = layers[l];
        bool last = (l + 1 == layers.size());
        int expectedRows = last ? 1 : width;
        int expectedCols = l == 0 ? features : width;
        if (layer.rows != expectedRows || layer.cols != expectedCols) {
            std::ostringstream message;
            message << "layer " << l << " is " << layer.rows << " x " << layer.cols << ", expected " << expectedRows
                    << " x " << expectedCols;
            fail(message.str());
        }
        if ((int) layer.weight.size() != layer.rows * layer.cols || (int) layer.bias.size() != layer.rows)
            fail("layer weight/bias sizes do not match their shape");
    }
}

CGNetModel::Workspace::~Workspace() {
    for (double* p : memory)
        std::free(p);
}

double* CGNetModel::Workspace::allocate(size_t n) {
    memory.push_back(alignedZeros(n));
    return memory.back();
}

CGNetModel::CGNetModel(const CGNetParameters& p) : parameters(p) {
    parameters.validate();
    numFeatures = parameters.numFeatures();
    numHidden = (int) parameters.layers.size() - 1;
    int width = parameters.layers[0].rows;
    paddedFeatures = padded(numFeatures);
    paddedWidth = padded(width);
    for (int l = 0; l < numHidden; l++) {
        const LinearLayer& layer = parameters.layers[l];
        int in = layer.cols, out = layer.rows;
        int paddedIn = l == 0 ? paddedFeatures : paddedWidth;
        double* forward = alignedZeros((size_t) paddedIn * paddedWidth);  // in x out (W transposed)
        double* b = alignedZeros(paddedWidth);
        for (int i = 0; i < out; i++) {
            b[i] = layer.bias[i];
            for (int j = 0; j < in; j++) {
                double w = layer.weight[(size_t) i * in + j];
                forward[(size_t) j * paddedWidth + i] = w;
            }
        }
        allocations.push_back(forward);
        allocations.push_back(b);
        forwardMatrix.push_back(forward);
        bias.push_back(b);
        inputDim.push_back(in);
    }
    const LinearLayer& output = parameters.layers.back();
    outputWeight.assign(paddedWidth, 0.0);
    for (int i = 0; i < output.cols; i++)
        outputWeight[i] = output.weight[i];
    outputBias = output.bias[0];
}

CGNetModel::~CGNetModel() {
    for (double* p : allocations)
        std::free(p);
}

std::unique_ptr<CGNetModel::Workspace> CGNetModel::createWorkspace() const {
    return std::unique_ptr<Workspace>(new Workspace());
}

void CGNetModel::reserve(Workspace& w, int count) const {
    if (count <= w.capacity)
        return;
    for (double* p : w.memory)
        std::free(p);
    w.memory.clear();
    w.derivative.clear();
    size_t copies = (size_t) ((count + BLOCK - 1) / BLOCK) * BLOCK;
    w.features = w.allocate(copies * paddedFeatures);
    w.gradFeatures = w.allocate(copies * paddedFeatures);
    w.hidden = w.allocate(copies * paddedWidth);
    w.preact = w.allocate(copies * paddedWidth);
    w.grad = w.allocate(copies * paddedWidth);
    w.gradPre = w.allocate(copies * paddedWidth);
    for (int l = 0; l < numHidden; l++)
        w.derivative.push_back(w.allocate(copies * paddedWidth));
    w.capacity = (int) copies;
}

void CGNetModel::rawFeatures(const double* x, double* f) const {
    const CGNetParameters& p = parameters;
    int k = 0;
    for (size_t n = 0; n < p.bondIndex.size(); n += 2) {
        double v[3];
        sub(x + 3 * p.bondIndex[n + 1], x + 3 * p.bondIndex[n], v);
        f[k++] = std::sqrt(dot(v, v));
    }
    for (size_t n = 0; n < p.angleIndex.size(); n += 3) {
        const double* xa = x + 3 * p.angleIndex[n];
        const double* xb = x + 3 * p.angleIndex[n + 1];
        const double* xc = x + 3 * p.angleIndex[n + 2];
        double u[3], v[3], c[3];
        sub(xa, xb, u);
        sub(xc, xb, v);
        cross(u, v, c);
        f[k++] = std::atan2(std::sqrt(dot(c, c) + ANGLE_EPSILON), dot(u, v));
    }
    for (size_t n = 0; n < p.dihedralIndex.size(); n += 4) {
        const double* xa = x + 3 * p.dihedralIndex[n];
        const double* xb = x + 3 * p.dihedralIndex[n + 1];
        const double* xc = x + 3 * p.dihedralIndex[n + 2];
        const double* xd = x + 3 * p.dihedralIndex[n + 3];
        double b1[3], b2[3], b3[3], n1[3], n2[3];
        sub(xb, xa, b1);
        sub(xc, xb, b2);
        sub(xd, xc, b3);
        cross(b1, b2, n1);
        cross(b2, b3, n2);
        double cx = dot(n1, n2);
        double cy = std::sqrt(dot(b2, b2)) * dot(b1, n2);
        double r = std::sqrt(cx * cx + cy * cy + DIHEDRAL_EPSILON);
        f[k++] = cx / r;
        f[k++] = cy / r;
    }
    for (size_t n = 0; n < p.pairIndex.size(); n += 2) {
        double v[3];
        sub(x + 3 * p.pairIndex[n + 1], x + 3 * p.pairIndex[n], v);
        f[k++] = std::sqrt(dot(v, v));
    }
}

void CGNetModel::featureBackward(const double* x, const double* g, double* gx) const {
    const CGNetParameters& p = parameters;
    std::memset(gx, 0, sizeof(double) * 3 * p.numBeads);
    int k = 0;
    for (size_t n = 0; n < p.bondIndex.size(); n += 2, k++) {
        int i = p.bondIndex[n], j = p.bondIndex[n + 1];
        double v[3];
        sub(x + 3 * j, x + 3 * i, v);
        double d = std::sqrt(dot(v, v));
        double s = d > 0 ? g[k] / d : 0.0;
        axpy(s, v, gx + 3 * j);
        axpy(-s, v, gx + 3 * i);
    }
    for (size_t n = 0; n < p.angleIndex.size(); n += 3, k++) {
        int a = p.angleIndex[n], b = p.angleIndex[n + 1], c = p.angleIndex[n + 2];
        double u[3], v[3], cr[3], vc[3], cu[3];
        sub(x + 3 * a, x + 3 * b, u);
        sub(x + 3 * c, x + 3 * b, v);
        cross(u, v, cr);
        double s = std::sqrt(dot(cr, cr) + ANGLE_EPSILON);
        double kk = dot(u, v);
        double denominator = s * s + kk * kk;
        double dS = g[k] * kk / denominator / s;  // d theta/d s, divided by s (ds = cr.dcr / s)
        double dK = -g[k] * s / denominator;      // d theta/d k
        cross(v, cr, vc);
        cross(cr, u, cu);
        double gu[3] = {dS * vc[0] + dK * v[0], dS * vc[1] + dK * v[1], dS * vc[2] + dK * v[2]};
        double gv[3] = {dS * cu[0] + dK * u[0], dS * cu[1] + dK * u[1], dS * cu[2] + dK * u[2]};
        axpy(1.0, gu, gx + 3 * a);
        axpy(1.0, gv, gx + 3 * c);
        axpy(-1.0, gu, gx + 3 * b);
        axpy(-1.0, gv, gx + 3 * b);
    }
    for (size_t n = 0; n < p.dihedralIndex.size(); n += 4, k += 2) {
        int a = p.dihedralIndex[n], b = p.dihedralIndex[n + 1], c = p.dihedralIndex[n + 2], d = p.dihedralIndex[n + 3];
        double b1[3], b2[3], b3[3], n1[3], n2[3];
        sub(x + 3 * b, x + 3 * a, b1);
        sub(x + 3 * c, x + 3 * b, b2);
        sub(x + 3 * d, x + 3 * c, b3);
        cross(b1, b2, n1);
        cross(b2, b3, n2);
        double cx = dot(n1, n2);
        double length = std::sqrt(dot(b2, b2));
        double m = dot(b1, n2);
        double cy = length * m;
        double r = std::sqrt(cx * cx + cy * cy + DIHEDRAL_EPSILON);
        double r3 = r * r * r;
        double gc = g[k], gs = g[k + 1];
        double gX = gc * (1.0 / r - cx * cx / r3) - gs * cx * cy / r3;
        double gY = -gc * cx * cy / r3 + gs * (1.0 / r - cy * cy / r3);
        // dx/db1 = b2 x n2, dx/db2 = n2 x b1 + b3 x n1, dx/db3 = n1 x b2
        // dy/db1 = L n2,    dy/db2 = m b2 / L + L (b3 x b1), dy/db3 = L n1
        double t[3], g1[3] = {0, 0, 0}, g2[3] = {0, 0, 0}, g3[3] = {0, 0, 0};
        cross(b2, n2, t);
        axpy(gX, t, g1);
        axpy(gY * length, n2, g1);
        cross(n2, b1, t);
        axpy(gX, t, g2);
        cross(b3, n1, t);
        axpy(gX, t, g2);
        if (length > 0)
            axpy(gY * m / length, b2, g2);
        cross(b3, b1, t);
        axpy(gY * length, t, g2);
        cross(n1, b2, t);
        axpy(gX, t, g3);
        axpy(gY * length, n1, g3);
        axpy(-1.0, g1, gx + 3 * a);
        axpy(1.0, g1, gx + 3 * b);
        axpy(-1.0, g2, gx + 3 * b);
        axpy(1.0, g2, gx + 3 * c);
        axpy(-1.0, g3, gx + 3 * c);
        axpy(1.0, g3, gx + 3 * d);
    }
    for (size_t n = 0; n < p.pairIndex.size(); n += 2, k++) {
        int i = p.pairIndex[n], j = p.pairIndex[n + 1];
        double v[3];
        sub(x + 3 * j, x + 3 * i, v);
        double dd = std::sqrt(dot(v, v));
        double s = dd > 0 ? g[k] / dd : 0.0;
        axpy(s, v, gx + 3 * j);
        axpy(-s, v, gx + 3 * i);
    }
}

namespace {

/*
 * exp(x) without branches or calls, so that GCC/Clang vectorise the activation loops (std::tanh and
 * std::exp are scalar library calls: ~6-10 us of the ~25 us per copy before). Cody-Waite reduction
 * x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of degree 12 for e^r (truncation < 1e-16 relative),
 * 2^n put into the exponent bits. Relative error ~2e-16 for x in [-708, 709] (clamped outside).
 */
inline double vectorExp(double x) {
    x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
    double t = x * 1.4426950408889634 + shifter;
    double n = t - shifter;
    double r = x - n * 0.6931471803691238;        // ln2 high part (exact product for |n| < 2^11)
    r = r - n * 1.9082149292705877e-10;            // ln2 low part
    double p = 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t bits = ((int64_t) n + 1023) << 52;
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define FLOWMATCH_HAVE_BIT_CAST 1
#endif
#endif
#ifdef FLOWMATCH_HAVE_BIT_CAST
    double scale = __builtin_bit_cast(double, bits);  // a memcpy here keeps GCC from vectorising the loop
#else
    double scale;
    std::memcpy(&scale, &bits, sizeof(double));
#endif
    return p * scale;
}

/* tanh(z) = sign(z) (1 - e)/(1 + e), e = exp(-2|z|): absolute error ~2e-16 (relative for |z| > ~0.1). */
inline double vectorTanh(double z) {
    double e = vectorExp(-2.0 * std::fabs(z));
    double t = (1.0 - e) / (1.0 + e);
    return z < 0 ? -t : t;
}

// act(z) into value (added to `add` when not null), act'(z) into derivative, for n entries
inline void tanhLayer(int n, const double* __restrict z, double* __restrict value, double add,
                      double* __restrict derivative) {
    for (int i = 0; i < n; i++) {  // value = add * value + tanh(z): one vectorised loop for both cases
        double t = vectorTanh(z[i]);
        value[i] = add * value[i] + t;
        derivative[i] = 1.0 - t * t;
    }
}

inline void siluLayer(int n, const double* __restrict z, double* __restrict value, double add,
                      double* __restrict derivative) {
    for (int i = 0; i < n; i++) {
        double s = 1.0 / (1.0 + vectorExp(-z[i]));
        value[i] = add * value[i] + z[i] * s;
        derivative[i] = s * (1.0 + z[i] * (1.0 - s));
    }
}

inline void activate(Activation activation, int n, const double* z, double* value, bool accumulate, double* derivative) {
    switch (activation) {
        case Activation::Tanh:
            if (!accumulate)
                std::fill(value, value + n, 0.0);  // 0 * value would keep NaN/inf of uninitialised memory
            tanhLayer(n, z, value, accumulate ? 1.0 : 0.0, derivative);
            break;
        case Activation::SiLU:
            if (!accumulate)
                std::fill(value, value + n, 0.0);
            siluLayer(n, z, value, accumulate ? 1.0 : 0.0, derivative);
            break;
        case Activation::Softplus:
            for (int i = 0; i < n; i++) {
                double a, d;
                if (z[i] > SOFTPLUS_THRESHOLD) {
                    a = z[i];
                    d = 1.0;
                }
                else {
                    double e = std::exp(z[i]);
                    a = std::log1p(e);
                    d = e / (e + 1.0);
                }
                value[i] = accumulate ? value[i] + a : a;
                derivative[i] = d;
            }
            break;
    }
}

}  // namespace

void CGNetModel::evaluate(int count, const double* const* positions, double* energies, double* const* gradients,
                          Workspace& w) const {
    if (count < 1)
        return;
    reserve(w, count);
    const CGNetParameters& p = parameters;
    const int width = p.layers[0].rows;
    const size_t pw = paddedWidth, pf = paddedFeatures;
    // Layer by layer over all copies (in blocks of BLOCK): one layer's weights stay in cache while
    // every copy passes through it.
    for (int b = 0; b < count; b++) {
        double* f = w.features + b * pf;
        rawFeatures(positions[b], f);
        for (int k = 0; k < numFeatures; k++)
            f[k] = (f[k] - p.mean[k]) / p.stddev[k];
    }
    for (int l = 0; l < numHidden; l++) {
        for (int s = 0; s < count; s += BLOCK) {
            int n = std::min(BLOCK, count - s);
            if (l == 0)
                blockMatVec(n, numFeatures, paddedWidth, forwardMatrix[0], w.features + s * pf, paddedFeatures, bias[0], 0,
                            w.preact + s * pw, paddedWidth);
            else
                blockMatVec(n, width, paddedWidth, forwardMatrix[l], w.hidden + s * pw, paddedWidth, bias[l], 0,
                            w.preact + s * pw, paddedWidth);
        }
        // input layer: h = act(z); residual layers: h = h + act(z)
        for (int b = 0; b < count; b++)
            activate(p.activation, width, w.preact + b * pw, w.hidden + b * pw, l > 0, w.derivative[l] + b * pw);
    }
    for (int b = 0; b < count; b++) {
        const double* h = w.hidden + b * pw;
        double e = 0.0;
        for (int i = 0; i < width; i++)
            e += outputWeight[i] * h[i];
        energies[b] = e + outputBias;
    }
    if (gradients == nullptr)
        return;
    // backward: g = dE/dh
    for (int b = 0; b < count; b++)
        std::memcpy(w.grad + b * pw, outputWeight.data(), sizeof(double) * pw);
    for (int l = numHidden - 1; l >= 0; l--) {
        const double* d = w.derivative[l];
        for (size_t i = 0; i < (size_t) count * pw; i++)
            w.gradPre[i] = d[i] * w.grad[i];
        for (int s = 0; s < count; s += BLOCK) {
            int n = std::min(BLOCK, count - s);
            if (l > 0)  // residual: g = g + W^T (act' * g)
                blockMatTVec(n, paddedWidth, paddedWidth, forwardMatrix[l], w.gradPre + s * pw, paddedWidth,
                             w.grad + s * pw, paddedWidth, w.grad + s * pw, paddedWidth);
            else
                blockMatTVec(n, paddedFeatures, paddedWidth, forwardMatrix[0], w.gradPre + s * pw, paddedWidth, nullptr,
                             0, w.gradFeatures + s * pf, paddedFeatures);
        }
    }
    for (int b = 0; b < count; b++) {
        double* g = w.gradFeatures + b * pf;
        for (int k = 0; k < numFeatures; k++)
            g[k] /= p.stddev[k];
        featureBackward(positions[b], g, gradients[b]);
    }
}

}  // namespace OpenMMFlowMatch
