#include "CGNetForce.h"

#include "openmm/KernelFactory.h"
#include "openmm/OpenMMException.h"
#include "openmm/Platform.h"
#include "openmm/internal/ThreadPool.h"
#include "openmm/reference/ReferencePlatform.h"
#include "openmm/serialization/SerializationNode.h"

#include <algorithm>
#include <cstdint>
#include <typeinfo>
#include <cstring>
#include <sstream>
#include <stdexcept>

using namespace OpenMM;

namespace OpenMMFlowMatch {

// ------------------------------------------------------------------------------------- the force
CGNetForce::CGNetForce(const CGNetParameters& parameters, int replicas) : replicas(replicas) {
    if (replicas < 1)
        throw OpenMMException("CGNetForce: replicas must be >= 1");
    try {
        model = std::make_shared<CGNetModel>(parameters);
    }
    catch (const std::invalid_argument& error) {
        throw OpenMMException(error.what());
    }
    setName("CGNetForce");
}

namespace {

class CGNetForceImpl : public ForceImpl {
public:
    explicit CGNetForceImpl(const CGNetForce& owner) : owner(owner) {
    }
    void initialize(ContextImpl& context) override {
        const System& system = context.getSystem();
        int expected = owner.getNumReplicas() * owner.getParameters().numBeads;
        if (system.getNumParticles() != expected) {
            std::ostringstream message;
            message << "CGNetForce: the System has " << system.getNumParticles() << " particles but the force is for "
                    << owner.getNumReplicas() << " copies of " << owner.getParameters().numBeads << " beads";
            throw OpenMMException(message.str());
        }
        kernel = context.getPlatform().createKernel(CalcCGNetForceKernel::Name(), context);
        kernel.getAs<CalcCGNetForceKernel>().initialize(system, owner);
    }
    const CGNetForce& getOwner() const override {
        return owner;
    }
    void updateContextState(ContextImpl& context, bool& forcesInvalid) override {
    }
    double calcForcesAndEnergy(ContextImpl& context, bool includeForces, bool includeEnergy, int groups) override {
        if ((groups & (1 << owner.getForceGroup())) != 0)
            return kernel.getAs<CalcCGNetForceKernel>().execute(context, includeForces, includeEnergy);
        return 0.0;
    }
    std::map<std::string, double> getDefaultParameters() override {
        return std::map<std::string, double>();
    }
    std::vector<std::string> getKernelNames() override {
        return std::vector<std::string>(1, CalcCGNetForceKernel::Name());
    }
    std::vector<std::pair<int, int> > getBondedParticles() const override {
        // the beads of one copy are one molecule (keeps copies whole, e.g. for barostats)
        std::vector<std::pair<int, int> > bonds;
        int n = owner.getParameters().numBeads;
        for (int r = 0; r < owner.getNumReplicas(); r++)
            for (int i = 1; i < n; i++)
                bonds.push_back(std::make_pair(r * n + i - 1, r * n + i));
        return bonds;
    }

private:
    const CGNetForce& owner;
    Kernel kernel;
};

}  // namespace

ForceImpl* CGNetForce::createImpl() const {
    return new CGNetForceImpl(*this);
}

// ------------------------------------------------------------------------ Reference/CPU kernel
namespace {

/*
 * One kernel for the Reference and the CPU platform (both keep double-precision positions and
 * forces in ReferencePlatform::PlatformData). All copies go through the network together, layer
 * by layer; with several threads in the platform's pool (CPU platform property "Threads") each
 * thread takes a contiguous chunk of whole blocks of CGNetModel::BLOCK copies. Each copy owns its
 * particles, so threads write disjoint force entries; energies are summed in copy order (results
 * do not depend on the thread count).
 */
class ReferenceCalcCGNetForceKernel : public CalcCGNetForceKernel {
public:
    ReferenceCalcCGNetForceKernel(std::string name, const Platform& platform) : CalcCGNetForceKernel(name, platform) {
    }
    void initialize(const System& system, const CGNetForce& force) override {
        model = force.getSharedModel();
        numBeads = force.getParameters().numBeads;
        replicas = force.getNumReplicas();
        numBlocks = (replicas + CGNetModel::BLOCK - 1) / CGNetModel::BLOCK;
        energies.assign(replicas, 0.0);
        x.assign(replicas, nullptr);
        g.assign(replicas, nullptr);
        gradient.assign((size_t) replicas * numBeads * 3, 0.0);
    }
    double execute(ContextImpl& context, bool includeForces, bool includeEnergy) override {
        ReferencePlatform::PlatformData* data = reinterpret_cast<ReferencePlatform::PlatformData*>(context.getPlatformData());
        const std::vector<Vec3>& pos = *data->positions;
        std::vector<Vec3>& forces = *data->forces;
        // contiguous chunks of whole blocks, one per thread
        int threads = std::max(1, std::min(data->threads.getNumThreads(), numBlocks));
        int blocksPerThread = (numBlocks + threads - 1) / threads;
        while ((int) workspaces.size() < threads)
            workspaces.push_back(model->createWorkspace());
        auto work = [&](int thread) {
            int first = std::min(replicas, thread * blocksPerThread * CGNetModel::BLOCK);
            int last = std::min(replicas, (thread + 1) * blocksPerThread * CGNetModel::BLOCK);
            if (first >= last)
                return;
            for (int r = first; r < last; r++) {
                // Vec3 is three contiguous doubles; a copy's beads are consecutive particles
                x[r] = reinterpret_cast<const double*>(&pos[(size_t) r * numBeads]);
                g[r] = &gradient[(size_t) r * numBeads * 3];
            }
            model->evaluate(last - first, &x[first], &energies[first], includeForces ? &g[first] : nullptr,
                            *workspaces[thread]);
            if (includeForces)
                for (int r = first; r < last; r++) {
                    size_t start = (size_t) r * numBeads;
                    for (int i = 0; i < numBeads; i++) {
                        forces[start + i][0] -= g[r][3 * i];
                        forces[start + i][1] -= g[r][3 * i + 1];
                        forces[start + i][2] -= g[r][3 * i + 2];
                    }
                }
        };
        if (threads == 1)
            work(0);
        else {
            data->threads.execute([&](ThreadPool& pool, int thread) {
                if (thread < threads)
                    work(thread);
            });
            data->threads.waitForThreads();
        }
        double energy = 0.0;  // in copy order: independent of the thread count
        for (double value : energies)
            energy += value;
        return includeEnergy ? energy : 0.0;
    }

private:
    static_assert(sizeof(Vec3) == 3 * sizeof(double), "Vec3 must be three packed doubles");
    std::shared_ptr<const CGNetModel> model;
    int numBeads = 0, replicas = 0, numBlocks = 0;
    std::vector<double> energies, gradient;
    std::vector<const double*> x;
    std::vector<double*> g;
    std::vector<std::unique_ptr<CGNetModel::Workspace> > workspaces;
};

class CGNetKernelFactory : public KernelFactory {
public:
    KernelImpl* createKernelImpl(std::string name, const Platform& platform, ContextImpl& context) const override {
        if (name == CalcCGNetForceKernel::Name())
            return new ReferenceCalcCGNetForceKernel(name, platform);
        throw OpenMMException("CGNetKernelFactory: unknown kernel '" + name + "'");
    }
};

// --------------------------------------------------------------------------------- base64
const char BASE64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string encodeDoubles(const std::vector<double>& values) {
    std::string bytes(values.size() * sizeof(double), '\0');
    for (size_t i = 0; i < values.size(); i++) {
        uint64_t bits;
        std::memcpy(&bits, &values[i], sizeof(double));
        for (int k = 0; k < 8; k++)  // little-endian, whatever the host
            bytes[8 * i + k] = (char) ((bits >> (8 * k)) & 0xff);
    }
    std::string out;
    out.reserve((bytes.size() + 2) / 3 * 4);
    for (size_t i = 0; i < bytes.size(); i += 3) {
        uint32_t chunk = (uint32_t) (unsigned char) bytes[i] << 16;
        if (i + 1 < bytes.size())
            chunk |= (uint32_t) (unsigned char) bytes[i + 1] << 8;
        if (i + 2 < bytes.size())
            chunk |= (uint32_t) (unsigned char) bytes[i + 2];
        out += BASE64[(chunk >> 18) & 63];
        out += BASE64[(chunk >> 12) & 63];
        out += i + 1 < bytes.size() ? BASE64[(chunk >> 6) & 63] : '=';
        out += i + 2 < bytes.size() ? BASE64[chunk & 63] : '=';
    }
    return out;
}

std::vector<double> decodeDoubles(const std::string& text, size_t expected, const std::string& what) {
    int table[256];
    for (int i = 0; i < 256; i++)
        table[i] = -1;
    for (int i = 0; i < 64; i++)
        table[(unsigned char) BASE64[i]] = i;
    std::string bytes;
    uint32_t buffer = 0;
    int bits = 0;
    for (char c : text) {
        if (c == '=' || c == '\n' || c == '\r' || c == ' ')
            continue;
        int value = table[(unsigned char) c];
        if (value < 0)
            throw OpenMMException("CGNetForce: invalid base64 in " + what);
        buffer = (buffer << 6) | (uint32_t) value;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            bytes += (char) ((buffer >> bits) & 0xff);
        }
    }
    if (bytes.size() != expected * sizeof(double)) {
        std::ostringstream message;
        message << "CGNetForce: " << what << " holds " << bytes.size() / sizeof(double) << " values, expected " << expected;
        throw OpenMMException(message.str());
    }
    std::vector<double> values(expected);
    for (size_t i = 0; i < expected; i++) {
        uint64_t v = 0;
        for (int k = 0; k < 8; k++)
            v |= (uint64_t) (unsigned char) bytes[8 * i + k] << (8 * k);
        std::memcpy(&values[i], &v, sizeof(double));
    }
    return values;
}

std::string encodeInts(const std::vector<int>& values) {
    std::ostringstream out;
    for (size_t i = 0; i < values.size(); i++)
        out << (i ? " " : "") << values[i];
    return out.str();
}

std::vector<int> decodeInts(const std::string& text, size_t width, const std::string& what) {
    std::istringstream in(text);
    std::vector<int> values;
    int value;
    while (in >> value)
        values.push_back(value);
    if (!in.eof() || values.size() % width != 0)
        throw OpenMMException("CGNetForce: malformed index table " + what);
    return values;
}

}  // namespace

// ------------------------------------------------------------------------------ serialization
CGNetForceProxy::CGNetForceProxy() : SerializationProxy("CGNetForce") {
}

void CGNetForceProxy::serialize(const void* object, SerializationNode& node) const {
    const CGNetForce& force = *reinterpret_cast<const CGNetForce*>(object);
    const CGNetParameters& p = force.getParameters();
    node.setIntProperty("version", 1);
    node.setIntProperty("forceGroup", force.getForceGroup());
    node.setStringProperty("name", force.getName());
    node.setIntProperty("replicas", force.getNumReplicas());
    node.setIntProperty("beads", p.numBeads);
    node.setStringProperty("activation", activationName(p.activation));
    node.setStringProperty("bonds", encodeInts(p.bondIndex));
    node.setStringProperty("angles", encodeInts(p.angleIndex));
    node.setStringProperty("dihedrals", encodeInts(p.dihedralIndex));
    node.setStringProperty("pairs", encodeInts(p.pairIndex));
    node.setIntProperty("features", p.numFeatures());
    node.setStringProperty("mean", encodeDoubles(p.mean));
    node.setStringProperty("std", encodeDoubles(p.stddev));
    SerializationNode& layers = node.createChildNode("Layers");
    for (const LinearLayer& layer : p.layers) {
        SerializationNode& child = layers.createChildNode("Layer");
        child.setIntProperty("rows", layer.rows);
        child.setIntProperty("cols", layer.cols);
        child.setStringProperty("weight", encodeDoubles(layer.weight));
        child.setStringProperty("bias", encodeDoubles(layer.bias));
    }
}

void* CGNetForceProxy::deserialize(const SerializationNode& node) const {
    int version = node.getIntProperty("version");
    if (version != 1)
        throw OpenMMException("CGNetForce: unsupported serialization version " + std::to_string(version) +
                              "; rebuild the force with this openmm_flowmatch");
    CGNetParameters p;
    p.numBeads = node.getIntProperty("beads");
    try {
        p.activation = activationFromName(node.getStringProperty("activation"));
    }
    catch (const std::invalid_argument& error) {
        throw OpenMMException(error.what());
    }
    p.bondIndex = decodeInts(node.getStringProperty("bonds", ""), 2, "bonds");
    p.angleIndex = decodeInts(node.getStringProperty("angles", ""), 3, "angles");
    p.dihedralIndex = decodeInts(node.getStringProperty("dihedrals", ""), 4, "dihedrals");
    p.pairIndex = decodeInts(node.getStringProperty("pairs", ""), 2, "pairs");
    size_t features = p.numFeatures();
    p.mean = decodeDoubles(node.getStringProperty("mean"), features, "mean");
    p.stddev = decodeDoubles(node.getStringProperty("std"), features, "std");
    for (const SerializationNode& child : node.getChildNode("Layers").getChildren()) {
        LinearLayer layer;
        layer.rows = child.getIntProperty("rows");
        layer.cols = child.getIntProperty("cols");
        if (layer.rows < 1 || layer.cols < 1)
            throw OpenMMException("CGNetForce: layer shapes must be positive");
        layer.weight = decodeDoubles(child.getStringProperty("weight"), (size_t) layer.rows * layer.cols, "layer weight");
        layer.bias = decodeDoubles(child.getStringProperty("bias"), layer.rows, "layer bias");
        p.layers.push_back(layer);
    }
    CGNetForce* force = new CGNetForce(p, node.getIntProperty("replicas"));
    force->setForceGroup(node.getIntProperty("forceGroup", 0));
    force->setName(node.getStringProperty("name", "CGNetForce"));
    return force;
}

}  // namespace OpenMMFlowMatch

// ------------------------------------------------------------------------ plugin entry points
using namespace OpenMMFlowMatch;

extern "C" {

/** Called by Platform::loadPluginLibrary / loadPluginsFromDirectory (registers no platform). */
void registerPlatforms() {
}

/** Called by Platform::loadPluginLibrary: the kernels of the Reference and CPU platforms. */
void registerKernelFactories() {
    for (int i = 0; i < Platform::getNumPlatforms(); i++) {
        Platform& platform = Platform::getPlatform(i);
        if (dynamic_cast<ReferencePlatform*>(&platform) != nullptr)
            platform.registerKernelFactory(CalcCGNetForceKernel::Name(), new CGNetKernelFactory());
    }
}

/** Version tag of this library, checked by the Python wrapper after loading. */
const char* openmmFlowmatchNativeVersion() {
    return OPENMM_FLOWMATCH_NATIVE_VERSION;
}

}

namespace {
// The serialization proxy is registered when the library is loaded (by dlopen in any way), so
// XmlSerializer can create CGNetForce once the library is in the process.
struct RegisterProxy {
    RegisterProxy() {
        SerializationProxy::registerProxy(typeid(CGNetForce), new CGNetForceProxy());
    }
} registerProxyAtLoad;
}  // namespace
