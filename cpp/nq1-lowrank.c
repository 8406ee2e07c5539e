// The NanoQuant layer's op chain: built and matched from one step table (see nq1-lowrank.h).
#include "nq1-lowrank.h"

#include "ggml-impl.h"

#include <stddef.h>
#include <string.h>

struct nq1_lowrank_step {
    enum ggml_op op;  // MUL: previous * operand (a scale); MUL_MAT: operand (a sign matrix) x previous
    size_t operand;   // offset of the operand in struct nq1_lowrank_layer
    bool optional;
};

static const struct nq1_lowrank_step nq1_lowrank_steps[] = {
    { GGML_OP_MUL,     offsetof(struct nq1_lowrank_layer, s_pre),  true  },
    { GGML_OP_MUL_MAT, offsetof(struct nq1_lowrank_layer, v),      false },
    { GGML_OP_MUL,     offsetof(struct nq1_lowrank_layer, s_mid),  true  },
    { GGML_OP_MUL_MAT, offsetof(struct nq1_lowrank_layer, u),      false },
    { GGML_OP_MUL,     offsetof(struct nq1_lowrank_layer, s_post), true  },
};
enum { NQ1_LOWRANK_STEPS = sizeof(nq1_lowrank_steps) / sizeof(nq1_lowrank_steps[0]) };

static struct ggml_tensor ** nq1_lowrank_operand(struct nq1_lowrank_layer * layer,
                                                 const struct nq1_lowrank_step * step) {
    return (struct ggml_tensor **) ((char *) layer + step->operand);
}

struct ggml_tensor * nq1_lowrank_build(struct ggml_context * ctx, const struct nq1_lowrank_layer * layer) {
    struct nq1_lowrank_layer l = *layer;
    struct ggml_tensor * t = l.x;
    for (int i = 0; i < NQ1_LOWRANK_STEPS; i++) {
        const struct nq1_lowrank_step * step = &nq1_lowrank_steps[i];
        struct ggml_tensor * operand = *nq1_lowrank_operand(&l, step);
        if (operand == NULL) {
            GGML_ASSERT(step->optional && "a NanoQuant layer needs both sign matrices");
            continue;
        }
        t = step->op == GGML_OP_MUL ? ggml_mul(ctx, t, operand) : ggml_mul_mat(ctx, operand, t);
    }
    return t;
}

// The chain of the steps in `present` (a bit per step) at node `first`, if it is there.
static bool nq1_lowrank_match_steps(const struct ggml_cgraph * cgraph, int first, unsigned present,
                                    struct nq1_lowrank_chain * chain) {
    enum ggml_op ops[NQ1_LOWRANK_STEPS];
    const struct nq1_lowrank_step * steps[NQ1_LOWRANK_STEPS];
    int n = 0;
    for (int i = 0; i < NQ1_LOWRANK_STEPS; i++) {
        if (present & (1u << i)) {
            steps[n] = &nq1_lowrank_steps[i];
            ops[n++] = nq1_lowrank_steps[i].op;
        }
    }
    const int out = first + n - 1;
    if (first < 0 || out >= cgraph->n_nodes || !ggml_can_fuse_subgraph(cgraph, first, n, ops, &out, 1)) {
        return false;
    }
    struct nq1_lowrank_chain c;
    memset(&c, 0, sizeof(c));
    for (int k = 0; k < n; k++) {
        struct ggml_tensor * node = cgraph->nodes[first + k];
        const bool scale = steps[k]->op == GGML_OP_MUL;
        struct ggml_tensor * input = scale ? node->src[0] : node->src[1];
        struct ggml_tensor * operand = scale ? node->src[1] : node->src[0];
        if (k == 0) {
            c.layer.x = input;
        } else if (input != cgraph->nodes[first + k - 1]) {
            return false;
        }
        if (scale && (operand->ne[0] != input->ne[0] || ggml_nrows(operand) != 1)) {
            return false;  // not a per-row scale of what it multiplies
        }
        *nq1_lowrank_operand(&c.layer, steps[k]) = operand;
        if (steps[k]->operand == offsetof(struct nq1_lowrank_layer, v)) {
            c.v_product = node;
        }
        if (steps[k]->operand == offsetof(struct nq1_lowrank_layer, u)) {
            c.u_input = input;
        }
    }
    c.first = first;
    c.n_nodes = n;
    c.out = cgraph->nodes[out];
    *chain = c;
    return true;
}

static int count_bits(unsigned bits) {
    int n = 0;
    for (; bits != 0; bits &= bits - 1) {
        n++;
    }
    return n;
}

// the V product a chain at `first` would have: the first node, or the second after s_pre
static const struct ggml_tensor * nq1_lowrank_v_product(const struct ggml_cgraph * cgraph, int first) {
    const struct ggml_tensor * node = cgraph->nodes[first];
    if (node->op == GGML_OP_MUL_MAT) {
        return node;
    }
    const struct ggml_tensor * next = first + 1 < cgraph->n_nodes ? cgraph->nodes[first + 1] : NULL;
    return node->op == GGML_OP_MUL && next && next->op == GGML_OP_MUL_MAT && next->src[1] == node ? next : NULL;
}

bool nq1_lowrank_match(const struct ggml_cgraph * cgraph, int first, struct nq1_lowrank_chain * chain) {
    // backends ask at every node: turn away everything but a product by NQ1 signs at once
    const struct ggml_tensor * v_product = nq1_lowrank_v_product(cgraph, first);
    if (v_product == NULL || v_product->src[0]->type != GGML_TYPE_NQ1) {
        return false;
    }
    unsigned optional = 0;
    for (int i = 0; i < NQ1_LOWRANK_STEPS; i++) {
        optional |= nq1_lowrank_steps[i].optional ? 1u << i : 0u;
    }
    const unsigned all = (1u << NQ1_LOWRANK_STEPS) - 1;
    // longest first: a scale that is there belongs to the layer, not to the op after it
    for (int n_left_out = 0; n_left_out <= NQ1_LOWRANK_STEPS; n_left_out++) {
        for (unsigned left_out = 0; left_out <= optional; left_out++) {
            if ((left_out & ~optional) != 0 || count_bits(left_out) != n_left_out) {
                continue;
            }
            if (nq1_lowrank_match_steps(cgraph, first, all & ~left_out, chain)) {
                return true;
            }
        }
    }
    return false;
}
