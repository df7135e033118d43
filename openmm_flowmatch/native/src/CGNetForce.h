#ifndef OPENMM_FLOWMATCH_CGNET_FORCE_H_
#define OPENMM_FLOWMATCH_CGNET_FORCE_H_

/*
 * CGNetForce: an OpenMM Force whose energy is the sum of a CGNet (CGNetModel.h) over R
 * independent copies of n beads (particles r*n .. r*n + n - 1 form copy r), the same as the
 * openmm_flowmatch TorchScript artifact. Kernels for the Reference and CPU platforms; the force
 * serializes with XmlSerializer (type "CGNetForce"), weights embedded exactly (base64 float64).
 *
 * Python creates it with openmm.XmlSerializer.deserialize after loading this plugin with
 * openmm.Platform.loadPluginLibrary (see openmm_flowmatch/native/__init__.py).
 */

#include "CGNetModel.h"

#include "openmm/Force.h"
#include "openmm/KernelImpl.h"
#include "openmm/System.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/internal/ForceImpl.h"
#include "openmm/serialization/SerializationProxy.h"

#include <memory>
#include <string>
#include <vector>

namespace OpenMMFlowMatch {

class CGNetForce : public OpenMM::Force {
public:
    /**
     * @param parameters  the network of one copy
     * @param replicas    number of independent copies (the System has replicas * numBeads particles)
     */
    CGNetForce(const CGNetParameters& parameters, int replicas);
    const CGNetParameters& getParameters() const {
        return model->getParameters();
    }
    const CGNetModel& getModel() const {
        return *model;
    }
    /** The evaluator, shared (it is immutable) with copies of this force and with kernels. */
    std::shared_ptr<const CGNetModel> getSharedModel() const {
        return model;
    }
    int getNumReplicas() const {
        return replicas;
    }
    bool usesPeriodicBoundaryConditions() const override {
        return false;
    }

protected:
    OpenMM::ForceImpl* createImpl() const override;

private:
    std::shared_ptr<const CGNetModel> model;  // immutable, shared with kernels
    int replicas;
};

class CalcCGNetForceKernel : public OpenMM::KernelImpl {
public:
    static std::string Name() {
        return "CalcFlowMatchCGNetForce";
    }
    CalcCGNetForceKernel(std::string name, const OpenMM::Platform& platform) : OpenMM::KernelImpl(name, platform) {
    }
    virtual void initialize(const OpenMM::System& system, const CGNetForce& force) = 0;
    virtual double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy) = 0;
};

class CGNetForceProxy : public OpenMM::SerializationProxy {
public:
    CGNetForceProxy();
    void serialize(const void* object, OpenMM::SerializationNode& node) const override;
    void* deserialize(const OpenMM::SerializationNode& node) const override;
};

}  // namespace OpenMMFlowMatch

#endif
