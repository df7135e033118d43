#ifndef OPENMM_FLOWMATCH_CGNET_MODEL_H_
#define OPENMM_FLOWMATCH_CGNET_MODEL_H_

/*
 * The CGNet of openmm_flowmatch (openmm_flowmatch/forcefield/networks.py, features.py) in plain
 * C++, double precision: invariant features of one CG copy (bond lengths, angles, signed dihedrals
 * as (cos, sin), pair distances), z-scored with the stored mean/std, then the residual MLP
 *     h = act(W0 f + b0);  h = h + act(Wl h + bl) (l = 1..L-1);  E = w h + b
 * and its gradient with respect to the bead positions by hand-written backpropagation.
 *
 * No OpenMM dependency: CGNetForce (CGNetForce.h) owns one CGNetModel and calls evaluate() for
 * blocks of copies.
 */

#include <memory>
#include <string>
#include <vector>

namespace OpenMMFlowMatch {

/** Activation functions that the model evaluates exactly like torch.nn (Tanh, SiLU, Softplus(beta=1, threshold=20)). */
enum class Activation { Tanh = 0, SiLU = 1, Softplus = 2 };

Activation activationFromName(const std::string& name);
std::string activationName(Activation activation);

/** One nn.Linear: weight rows x cols (row-major, as torch stores it: out x in), bias of length rows. */
struct LinearLayer {
    int rows = 0;
    int cols = 0;
    std::vector<double> weight;
    std::vector<double> bias;
};

/** Everything that defines a CGNet of one copy; layers = input, residual..., output (1 row). */
struct CGNetParameters {
    int numBeads = 0;
    Activation activation = Activation::Tanh;
    std::vector<int> bondIndex;      // 2 per bond (i, j): |x_j - x_i|
    std::vector<int> angleIndex;     // 3 per angle (a, b, c): angle at b
    std::vector<int> dihedralIndex;  // 4 per dihedral (a, b, c, d): cos, sin
    std::vector<int> pairIndex;      // 2 per pair (i, j): |x_j - x_i|
    std::vector<double> mean;        // one per feature
    std::vector<double> stddev;      // one per feature
    std::vector<LinearLayer> layers;

    int numFeatures() const {
        return (int) (bondIndex.size() / 2 + angleIndex.size() / 3 + 2 * (dihedralIndex.size() / 4) + pairIndex.size() / 2);
    }
    /** Throws std::invalid_argument describing the first inconsistency. */
    void validate() const;
};

/**
 * Evaluator of a CGNet. Thread-safe for concurrent evaluate() calls with distinct Workspaces.
 */
class CGNetModel {
public:
    /** Copies that one register-blocked matrix-vector product processes together. */
    static const int BLOCK = 4;
    /** Scratch memory of one evaluating thread (aligned buffers, freed with the workspace). */
    struct Workspace {
        std::vector<double*> memory;
        double *features, *hidden, *preact, *grad, *gradPre, *gradFeatures, *raw;
        std::vector<double*> derivative;  // per hidden layer: activation derivative, copies x paddedWidth
        int capacity = 0;                 // copies the buffers hold
        Workspace() = default;
        Workspace(const Workspace&) = delete;
        Workspace& operator=(const Workspace&) = delete;
        ~Workspace();
        double* allocate(size_t n);
    };

    explicit CGNetModel(const CGNetParameters& parameters);
    ~CGNetModel();
    const CGNetParameters& getParameters() const {
        return parameters;
    }
    std::unique_ptr<Workspace> createWorkspace() const;
    /**
     * Energies and gradients of `count` copies (any number; the workspace grows as needed).
     *
     * @param positions  count pointers, each to numBeads*3 doubles (x, y, z of every bead, nm)
     * @param energies   count energies (kJ/mol), written
     * @param gradients  count pointers to numBeads*3 doubles that receive dE/dx (overwritten), or
     *                   nullptr for energies only
     */
    void evaluate(int count, const double* const* positions, double* energies, double* const* gradients,
                  Workspace& workspace) const;

private:
    void reserve(Workspace& workspace, int count) const;
    void rawFeatures(const double* x, double* features) const;
    void featureBackward(const double* x, const double* gradFeatures, double* gradX) const;
    CGNetParameters parameters;
    int numFeatures, numHidden;
    int paddedFeatures, paddedWidth;
    // per hidden layer l (input layer first): the weight matrix transposed (rows = padded in,
    // cols = padded out), zero-padded, 64-byte aligned; the forward pass reads it by columns, the
    // backward pass by rows (one copy of the weights for both: they stay in the L2 cache)
    std::vector<double*> forwardMatrix, bias;
    std::vector<int> inputDim;
    std::vector<double*> allocations;
    std::vector<double> outputWeight;
    double outputBias;
};

}  // namespace OpenMMFlowMatch

#endif
