/*
 * CGNetForce on OpenMM's common compute layer (ComputeContext / ComputeArray / ComputeKernel), so
 * the same kernel source is compiled by OpenMM for OpenCL, CUDA and HIP. This file is built into a
 * separate plugin library per GPU platform (libOpenMMFlowMatchNativeOpenCL.so, ...CUDA.so) that
 * links the main plugin (CGNetForce, its serialization) and that platform's OpenMM library; the
 * macro FLOWMATCH_PLATFORM_OPENCL / FLOWMATCH_PLATFORM_CUDA selects only how the ComputeContext
 * is found and which platform the factory is registered for.
 *
 * One work group per CG copy (a grid-stride loop when there are more copies than groups):
 *   1. the copy's beads are read from posq through the inverse of the atom index (OpenMM reorders
 *      atoms on GPU platforms), features computed exactly as CGNetModel::rawFeatures, z-scored;
 *   2. the residual MLP, one thread per hidden unit, vectors in local memory; activation
 *      derivatives of every layer kept in a global scratch array;
 *   3. E = w.h + b by a local reduction, written per copy; a second kernel adds the copies'
 *      energies to OpenMM's energy buffer;
 *   4. backward pass through the layers (thread per input unit, W read coalesced), feature
 *      gradients divided by std, then bead gradients by the analytic feature derivatives
 *      (thread 0; a copy owns its beads, so forces are added to the fixed-point force buffer
 *      without atomics).
 * Arithmetic is in the context's precision (`real`: float for single and mixed, double for double).
 */

#include "CGNetForce.h"

#include "openmm/OpenMMException.h"
#include "openmm/Platform.h"
#include "openmm/common/ComputeArray.h"
#include "openmm/common/ComputeContext.h"
#include "openmm/common/ComputeKernel.h"
#include "openmm/common/ContextSelector.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/KernelFactory.h"

#if defined(FLOWMATCH_PLATFORM_OPENCL)
#include "openmm/opencl/OpenCLPlatform.h"
#define FLOWMATCH_PLATFORM_NAME "OpenCL"
namespace OpenMM { class OpenCLContext; }
typedef OpenMM::OpenCLPlatform FlowMatchGpuPlatform;
#elif defined(FLOWMATCH_PLATFORM_CUDA)
#include "openmm/cuda/CudaPlatform.h"
#define FLOWMATCH_PLATFORM_NAME "CUDA"
typedef OpenMM::CudaPlatform FlowMatchGpuPlatform;
#else
#error "define FLOWMATCH_PLATFORM_OPENCL or FLOWMATCH_PLATFORM_CUDA"
#endif

#include <algorithm>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace OpenMM;

namespace OpenMMFlowMatch {
namespace {

const char* KERNEL_SOURCE = R"KERNEL(
/* defines: NUM_BEADS NUM_BONDS NUM_ANGLES NUM_DIHEDRALS NUM_PAIRS NUM_FEATURES WIDTH NUM_HIDDEN
   ACTIVATION (0 tanh, 1 SiLU, 2 softplus) THREADS PADDED_NUM_ATOMS */
#define ANGLE_EPSILON ((real) 1e-20)
#define DIHEDRAL_EPSILON ((real) 1e-30)

DEVICE real activate(real z, real* derivative) {
#if ACTIVATION == 0
    real t = tanh(z);
    *derivative = 1 - t*t;
    return t;
#elif ACTIVATION == 1
    real s = 1 / (1 + exp(-z));
    *derivative = s*(1 + z*(1 - s));
    return z*s;
#else
    if (z > 20) {
        *derivative = 1;
        return z;
    }
    real e = exp(z);
    *derivative = e/(e + 1);
    return log1p(e);
#endif
}

DEVICE real3 sub3(const LOCAL_ARG real* x, int a, int b) {  /* x_a - x_b */
    return make_real3(x[3*a] - x[3*b], x[3*a+1] - x[3*b+1], x[3*a+2] - x[3*b+2]);
}

DEVICE void add3(LOCAL_ARG real* g, int a, real3 v) {
    g[3*a] += v.x;
    g[3*a+1] += v.y;
    g[3*a+2] += v.z;
}

KERNEL void invertAtomIndex(GLOBAL const int* RESTRICT atomIndex, GLOBAL int* RESTRICT inverse, int numAtoms) {
    for (int i = GLOBAL_ID; i < numAtoms; i += GLOBAL_SIZE)
        inverse[atomIndex[i]] = i;
}

/* raw feature(s) of item t (bonds, angles, dihedrals, pairs in this order) into f */
DEVICE void rawFeature(int t, const LOCAL_ARG real* x, GLOBAL const int* RESTRICT atoms, LOCAL_ARG real* f) {
    if (t < NUM_BONDS) {
        real3 v = sub3(x, atoms[2*t+1], atoms[2*t]);
        f[t] = SQRT(dot(v, v));
        return;
    }
    t -= NUM_BONDS;
    atoms += 2*NUM_BONDS;
    if (t < NUM_ANGLES) {
        real3 u = sub3(x, atoms[3*t], atoms[3*t+1]);
        real3 v = sub3(x, atoms[3*t+2], atoms[3*t+1]);
        real3 c = cross(u, v);
        f[NUM_BONDS + t] = atan2(SQRT(dot(c, c) + ANGLE_EPSILON), dot(u, v));
        return;
    }
    t -= NUM_ANGLES;
    atoms += 3*NUM_ANGLES;
    if (t < NUM_DIHEDRALS) {
        real3 b1 = sub3(x, atoms[4*t+1], atoms[4*t]);
        real3 b2 = sub3(x, atoms[4*t+2], atoms[4*t+1]);
        real3 b3 = sub3(x, atoms[4*t+3], atoms[4*t+2]);
        real3 n1 = cross(b1, b2), n2 = cross(b2, b3);
        real cx = dot(n1, n2);
        real cy = SQRT(dot(b2, b2))*dot(b1, n2);
        real r = SQRT(cx*cx + cy*cy + DIHEDRAL_EPSILON);
        f[NUM_BONDS + NUM_ANGLES + 2*t] = cx/r;
        f[NUM_BONDS + NUM_ANGLES + 2*t + 1] = cy/r;
        return;
    }
    t -= NUM_DIHEDRALS;
    atoms += 4*NUM_DIHEDRALS;
    real3 v = sub3(x, atoms[2*t+1], atoms[2*t]);
    f[NUM_BONDS + NUM_ANGLES + 2*NUM_DIHEDRALS + t] = SQRT(dot(v, v));
}

/* dE/dx of all beads from dE/d(raw feature) g: CGNetModel::featureBackward */
DEVICE void featureBackward(const LOCAL_ARG real* x, GLOBAL const int* RESTRICT atoms, const LOCAL_ARG real* g, LOCAL_ARG real* gx) {
    for (int i = 0; i < 3*NUM_BEADS; i++)
        gx[i] = 0;
    int k = 0;
    for (int n = 0; n < NUM_BONDS; n++, k++) {
        int i = atoms[2*n], j = atoms[2*n+1];
        real3 v = sub3(x, j, i);
        real d = SQRT(dot(v, v));
        real s = d > 0 ? g[k]/d : 0;
        add3(gx, j, v*s);
        add3(gx, i, -v*s);
    }
    atoms += 2*NUM_BONDS;
    for (int n = 0; n < NUM_ANGLES; n++, k++) {
        int a = atoms[3*n], b = atoms[3*n+1], c = atoms[3*n+2];
        real3 u = sub3(x, a, b), v = sub3(x, c, b);
        real3 cr = cross(u, v);
        real s = SQRT(dot(cr, cr) + ANGLE_EPSILON);
        real kk = dot(u, v);
        real denominator = s*s + kk*kk;
        real dS = g[k]*kk/denominator/s;
        real dK = -g[k]*s/denominator;
        real3 gu = cross(v, cr)*dS + v*dK;
        real3 gv = cross(cr, u)*dS + u*dK;
        add3(gx, a, gu);
        add3(gx, c, gv);
        add3(gx, b, -gu - gv);
    }
    atoms += 3*NUM_ANGLES;
    for (int n = 0; n < NUM_DIHEDRALS; n++, k += 2) {
        int a = atoms[4*n], b = atoms[4*n+1], c = atoms[4*n+2], d = atoms[4*n+3];
        real3 b1 = sub3(x, b, a), b2 = sub3(x, c, b), b3 = sub3(x, d, c);
        real3 n1 = cross(b1, b2), n2 = cross(b2, b3);
        real cx = dot(n1, n2);
        real length = SQRT(dot(b2, b2));
        real m = dot(b1, n2);
        real cy = length*m;
        real r = SQRT(cx*cx + cy*cy + DIHEDRAL_EPSILON);
        real r3 = r*r*r;
        real gc = g[k], gs = g[k+1];
        real gX = gc*(1/r - cx*cx/r3) - gs*cx*cy/r3;
        real gY = -gc*cx*cy/r3 + gs*(1/r - cy*cy/r3);
        real3 g1 = cross(b2, n2)*gX + n2*(gY*length);
        real3 g2 = cross(n2, b1)*gX + cross(b3, n1)*gX + cross(b3, b1)*(gY*length);
        if (length > 0)
            g2 += b2*(gY*m/length);
        real3 g3 = cross(n1, b2)*gX + n1*(gY*length);
        add3(gx, a, -g1);
        add3(gx, b, g1 - g2);
        add3(gx, c, g2 - g3);
        add3(gx, d, g3);
    }
    atoms += 4*NUM_DIHEDRALS;
    for (int n = 0; n < NUM_PAIRS; n++, k++) {
        int i = atoms[2*n], j = atoms[2*n+1];
        real3 v = sub3(x, j, i);
        real d = SQRT(dot(v, v));
        real s = d > 0 ? g[k]/d : 0;
        add3(gx, j, v*s);
        add3(gx, i, -v*s);
    }
}

/* y[j] = act(b[j] + sum_k W[k*WIDTH + j] v[k]) (+ v[j] when residual); derivative into d */
DEVICE void forwardLayer(GLOBAL const real* RESTRICT forward, GLOBAL const real* RESTRICT bias, int inputs,
                         const LOCAL_ARG real* v, LOCAL_ARG real* y, GLOBAL real* RESTRICT d, bool residual) {
    for (int j = LOCAL_ID; j < WIDTH; j += LOCAL_SIZE) {
        real sum = bias[j];
        for (int k = 0; k < inputs; k++)
            sum += forward[k*WIDTH + j]*v[k];
        real derivative;
        real a = activate(sum, &derivative);
        y[j] = residual ? v[j] + a : a;
        d[j] = derivative;
    }
}

KERNEL void evaluateCGNet(GLOBAL const real4* RESTRICT posq, GLOBAL mm_long* RESTRICT forceBuffer,
        GLOBAL real* RESTRICT copyEnergy, GLOBAL const int* RESTRICT inverseIndex, GLOBAL const int* RESTRICT atoms,
        GLOBAL const real* RESTRICT mean, GLOBAL const real* RESTRICT invStd, GLOBAL const real* RESTRICT forward,
        GLOBAL const real* RESTRICT backward, GLOBAL const real* RESTRICT bias, GLOBAL const real* RESTRICT outWeight,
        real outBias, GLOBAL real* RESTRICT derivatives, int replicas, int includeForces) {
    LOCAL real x[3*NUM_BEADS];
    LOCAL real gx[3*NUM_BEADS];
    LOCAL real f[NUM_FEATURES];
    LOCAL real h[WIDTH];
    LOCAL real y[WIDTH];
    LOCAL real reduction[THREADS];
    const int numItems = NUM_BONDS + NUM_ANGLES + NUM_DIHEDRALS + NUM_PAIRS;
    for (int copy = GROUP_ID; copy < replicas; copy += NUM_GROUPS) {
        GLOBAL real* d = derivatives + (size_t) GROUP_ID*NUM_HIDDEN*WIDTH;
        for (int i = LOCAL_ID; i < NUM_BEADS; i += LOCAL_SIZE) {
            real4 p = posq[inverseIndex[copy*NUM_BEADS + i]];
            x[3*i] = p.x;
            x[3*i+1] = p.y;
            x[3*i+2] = p.z;
        }
        SYNC_THREADS;
        for (int t = LOCAL_ID; t < numItems; t += LOCAL_SIZE)
            rawFeature(t, x, atoms, f);
        SYNC_THREADS;
        for (int k = LOCAL_ID; k < NUM_FEATURES; k += LOCAL_SIZE)
            f[k] = (f[k] - mean[k])*invStd[k];
        SYNC_THREADS;
        forwardLayer(forward, bias, NUM_FEATURES, f, h, d, false);
        SYNC_THREADS;
        size_t offset = (size_t) NUM_FEATURES*WIDTH;
        for (int l = 1; l < NUM_HIDDEN; l++) {
            forwardLayer(forward + offset, bias + l*WIDTH, WIDTH, h, y, d + l*WIDTH, true);
            offset += (size_t) WIDTH*WIDTH;
            SYNC_THREADS;
            for (int j = LOCAL_ID; j < WIDTH; j += LOCAL_SIZE)
                h[j] = y[j];
            SYNC_THREADS;
        }
        real partial = 0;
        for (int j = LOCAL_ID; j < WIDTH; j += LOCAL_SIZE)
            partial += outWeight[j]*h[j];
        reduction[LOCAL_ID] = partial;
        SYNC_THREADS;
        for (int stride = THREADS/2; stride > 0; stride /= 2) {
            if (LOCAL_ID < stride)
                reduction[LOCAL_ID] += reduction[LOCAL_ID + stride];
            SYNC_THREADS;
        }
        if (LOCAL_ID == 0)
            copyEnergy[copy] = reduction[0] + outBias;
        if (includeForces) {
            /* h: dE/dh of the current layer's output; y: dE/d(pre-activation) */
            for (int j = LOCAL_ID; j < WIDTH; j += LOCAL_SIZE)
                h[j] = outWeight[j];
            SYNC_THREADS;
            for (int l = NUM_HIDDEN - 1; l >= 1; l--) {
                offset -= (size_t) WIDTH*WIDTH;
                for (int j = LOCAL_ID; j < WIDTH; j += LOCAL_SIZE)
                    y[j] = h[j]*d[l*WIDTH + j];
                SYNC_THREADS;
                for (int k = LOCAL_ID; k < WIDTH; k += LOCAL_SIZE) {
                    real sum = 0;
                    for (int j = 0; j < WIDTH; j++)
                        sum += backward[offset + j*WIDTH + k]*y[j];
                    h[k] += sum;
                }
                SYNC_THREADS;
            }
            for (int j = LOCAL_ID; j < WIDTH; j += LOCAL_SIZE)
                y[j] = h[j]*d[j];
            SYNC_THREADS;
            for (int k = LOCAL_ID; k < NUM_FEATURES; k += LOCAL_SIZE) {
                real sum = 0;
                for (int j = 0; j < WIDTH; j++)
                    sum += backward[j*NUM_FEATURES + k]*y[j];
                f[k] = sum*invStd[k];
            }
            SYNC_THREADS;
            if (LOCAL_ID == 0)
                featureBackward(x, atoms, f, gx);
            SYNC_THREADS;
            for (int i = LOCAL_ID; i < NUM_BEADS; i += LOCAL_SIZE) {
                int atom = inverseIndex[copy*NUM_BEADS + i];
                forceBuffer[atom] += (mm_long) realToFixedPoint(-gx[3*i]);
                forceBuffer[atom + PADDED_NUM_ATOMS] += (mm_long) realToFixedPoint(-gx[3*i+1]);
                forceBuffer[atom + 2*PADDED_NUM_ATOMS] += (mm_long) realToFixedPoint(-gx[3*i+2]);
            }
        }
        SYNC_THREADS;
    }
}

KERNEL void addEnergies(GLOBAL const real* RESTRICT copyEnergy, GLOBAL mixed* RESTRICT energyBuffer, int replicas) {
    mixed sum = 0;
    for (int i = LOCAL_ID; i < replicas; i += LOCAL_SIZE)
        sum += copyEnergy[i];
    energyBuffer[LOCAL_ID] += sum;
}
)KERNEL";

/** The layout of CGNetParameters as the kernel reads it (all in double; converted on upload). */
struct KernelTables {
    std::vector<int> atoms;                        // bonds, angles, dihedrals, pairs
    std::vector<double> invStd, forward, backward, bias;
};

KernelTables kernelTables(const CGNetParameters& p) {
    KernelTables tables;
    for (const std::vector<int>* index : {&p.bondIndex, &p.angleIndex, &p.dihedralIndex, &p.pairIndex})
        tables.atoms.insert(tables.atoms.end(), index->begin(), index->end());
    if (tables.atoms.empty())
        tables.atoms.push_back(0);  // no zero-size arrays
    for (double s : p.stddev)
        tables.invStd.push_back(1.0 / s);
    for (size_t l = 0; l + 1 < p.layers.size(); l++) {
        const LinearLayer& layer = p.layers[l];
        for (int k = 0; k < layer.cols; k++)  // forward: (input k, output j) at k*rows + j
            for (int j = 0; j < layer.rows; j++)
                tables.forward.push_back(layer.weight[(size_t) j * layer.cols + k]);
        tables.backward.insert(tables.backward.end(), layer.weight.begin(), layer.weight.end());  // j*cols + k
        tables.bias.insert(tables.bias.end(), layer.bias.begin(), layer.bias.end());
    }
    return tables;
}

class CommonCalcCGNetForceKernel : public CalcCGNetForceKernel {
public:
    CommonCalcCGNetForceKernel(std::string name, const Platform& platform, ComputeContext& cc)
        : CalcCGNetForceKernel(name, platform), cc(cc) {
    }
    void initialize(const System& system, const CGNetForce& force) override {
        ContextSelector selector(cc);
        const CGNetParameters& p = force.getParameters();
        replicas = force.getNumReplicas();
        int width = p.layers[0].rows;
        int hidden = (int) p.layers.size() - 1;
        KernelTables tables = kernelTables(p);
        int real = cc.getUseDoublePrecision() ? sizeof(double) : sizeof(float);
        upload(atoms, tables.atoms, "cgnetAtoms");
        uploadReal(mean, p.mean, real, "cgnetMean");
        uploadReal(invStd, tables.invStd, real, "cgnetInvStd");
        uploadReal(forward, tables.forward, real, "cgnetForward");
        uploadReal(backward, tables.backward, real, "cgnetBackward");
        uploadReal(bias, tables.bias, real, "cgnetBias");
        uploadReal(outWeight, p.layers.back().weight, real, "cgnetOutWeight");
        outBias = p.layers.back().bias[0];
        copyEnergy.initialize(cc, replicas, real, "cgnetCopyEnergy");
        inverse.initialize<int>(cc, std::max(1, cc.getNumAtoms()), "cgnetInverseIndex");
        threads = 32;
        while (threads < 128 && threads < width)
            threads *= 2;
        threads = std::min(threads, cc.getMaxThreadBlockSize());
        groups = std::min(replicas, std::max(1, 4 * cc.getNumThreadBlocks()));
        derivatives.initialize(cc, (size_t) groups * hidden * width, real, "cgnetDerivatives");
        std::map<std::string, std::string> defines;
        defines["NUM_BEADS"] = std::to_string(p.numBeads);
        defines["NUM_BONDS"] = std::to_string(p.bondIndex.size() / 2);
        defines["NUM_ANGLES"] = std::to_string(p.angleIndex.size() / 3);
        defines["NUM_DIHEDRALS"] = std::to_string(p.dihedralIndex.size() / 4);
        defines["NUM_PAIRS"] = std::to_string(p.pairIndex.size() / 2);
        defines["NUM_FEATURES"] = std::to_string(p.numFeatures());
        defines["WIDTH"] = std::to_string(width);
        defines["NUM_HIDDEN"] = std::to_string(hidden);
        defines["ACTIVATION"] = std::to_string((int) p.activation);
        defines["THREADS"] = std::to_string(threads);
        defines["PADDED_NUM_ATOMS"] = std::to_string(cc.getPaddedNumAtoms());
        ComputeProgram program = cc.compileProgram(KERNEL_SOURCE, defines);
        invertKernel = program->createKernel("invertAtomIndex");
        evaluateKernel = program->createKernel("evaluateCGNet");
        energyKernel = program->createKernel("addEnergies");
    }
    /** Kernel arguments, set on the first call: OpenMM may reallocate its buffers after initialize(). */
    void setArguments() {
        invertKernel->addArg(cc.getAtomIndexArray());
        invertKernel->addArg(inverse);
        invertKernel->addArg(cc.getNumAtoms());
        evaluateKernel->addArg(cc.getPosq());
        evaluateKernel->addArg(cc.getLongForceBuffer());
        for (ComputeArray* array : {&copyEnergy, &inverse, &atoms, &mean, &invStd, &forward, &backward, &bias, &outWeight})
            evaluateKernel->addArg(*array);
        if (cc.getUseDoublePrecision())
            evaluateKernel->addArg(outBias);
        else
            evaluateKernel->addArg((float) outBias);
        evaluateKernel->addArg(derivatives);
        evaluateKernel->addArg(replicas);
        evaluateKernel->addArg(1);  // includeForces, set per call
        energyKernel->addArg(copyEnergy);
        energyKernel->addArg(cc.getEnergyBuffer());
        energyKernel->addArg(replicas);
        energyThreads = (int) std::max<size_t>(1, std::min<size_t>(64, cc.getEnergyBuffer().getSize()));
        argumentsSet = true;
    }
    double execute(ContextImpl& context, bool includeForces, bool includeEnergy) override {
        ContextSelector selector(cc);
        if (!argumentsSet)
            setArguments();
        invertKernel->execute(cc.getNumAtoms());
        evaluateKernel->setArg(14, includeForces ? 1 : 0);
        evaluateKernel->execute(groups * threads, threads);
        if (includeEnergy)
            energyKernel->execute(energyThreads, energyThreads);
        return 0.0;
    }

private:
    void upload(ComputeArray& array, const std::vector<int>& values, const std::string& name) {
        array.initialize<int>(cc, values.size(), name);
        array.upload(values);
    }
    void uploadReal(ComputeArray& array, const std::vector<double>& values, int elementSize, const std::string& name) {
        array.initialize(cc, values.size(), elementSize, name);
        array.upload(values, true);  // converted to float where the context is single/mixed
    }
    ComputeContext& cc;
    ComputeArray atoms, mean, invStd, forward, backward, bias, outWeight, copyEnergy, inverse, derivatives;
    ComputeKernel invertKernel, evaluateKernel, energyKernel;
    double outBias = 0.0;
    int replicas = 0, threads = 0, groups = 0, energyThreads = 1;
    bool argumentsSet = false;
};

/** The ComputeContext of a Context on this library's platform (OpenCLContext / CudaContext derive from it). */
ComputeContext& computeContext(ContextImpl& context) {
    auto* data = reinterpret_cast<FlowMatchGpuPlatform::PlatformData*>(context.getPlatformData());
    // OpenCLContext and CudaContext have ComputeContext as their only base class, so the pointer is the
    // same; the platform headers that would let the compiler check this need the OpenCL/CUDA SDK headers.
    return *reinterpret_cast<ComputeContext*>(data->contexts[0]);
}

class CommonCGNetKernelFactory : public KernelFactory {
public:
    KernelImpl* createKernelImpl(std::string name, const Platform& platform, ContextImpl& context) const override {
        if (name == CalcCGNetForceKernel::Name())
            return new CommonCalcCGNetForceKernel(name, platform, computeContext(context));
        throw OpenMMException("CommonCGNetKernelFactory: unknown kernel '" + name + "'");
    }
};

}  // namespace
}  // namespace OpenMMFlowMatch

using namespace OpenMMFlowMatch;

extern "C" {

void registerPlatforms() {
}

/** Called by Platform::loadPluginLibrary: the CGNetForce kernel of this library's GPU platform. */
void registerKernelFactories() {
    for (int i = 0; i < Platform::getNumPlatforms(); i++) {
        Platform& platform = Platform::getPlatform(i);
        if (platform.getName() == FLOWMATCH_PLATFORM_NAME)
            platform.registerKernelFactory(CalcCGNetForceKernel::Name(), new CommonCGNetKernelFactory());
    }
}

const char* openmmFlowmatchNativeGpuPlatform() {
    return FLOWMATCH_PLATFORM_NAME;
}

}
