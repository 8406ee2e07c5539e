// nanoquant._core.Engine: one model and one context of the patched libllama (the same library the tools link).
// The Python class nanoquant.Model builds generation, streaming, chat and stop strings on these primitives; the loops
// that cost time (prompt decoding, one decode + sample per token, perplexity) run here with the GIL released.
#include "llama.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// llama.cpp reports why a load failed only through its log; keep the last lines so exceptions can quote them
struct LogTail {
    std::mutex mutex;
    std::deque<std::string> lines;
    std::string partial;
    bool verbose = false;
};

LogTail & log_tail() {
    static LogTail tail;
    return tail;
}

void log_callback(ggml_log_level level, const char * text, void *) {
    LogTail & tail = log_tail();
    std::lock_guard<std::mutex> lock(tail.mutex);
    if (tail.verbose) {
        fputs(text, stderr);
    }
    if (level == GGML_LOG_LEVEL_DEBUG) {
        return;
    }
    tail.partial += text;
    size_t pos;
    while ((pos = tail.partial.find('\n')) != std::string::npos) {
        std::string line = tail.partial.substr(0, pos);
        tail.partial.erase(0, pos + 1);
        if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN ||
            (level == GGML_LOG_LEVEL_CONT && !tail.lines.empty())) {
            tail.lines.push_back(line);
            if (tail.lines.size() > 8) {
                tail.lines.pop_front();
            }
        }
    }
}

std::string take_log_tail() {
    LogTail & tail = log_tail();
    std::lock_guard<std::mutex> lock(tail.mutex);
    std::string out;
    for (const auto & line : tail.lines) {
        out += (out.empty() ? "" : "\n") + line;
    }
    tail.lines.clear();
    return out;
}

void set_verbose(bool verbose) {
    std::lock_guard<std::mutex> lock(log_tail().mutex);
    log_tail().verbose = verbose;
}

void backend_init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

struct SamplerSettings {
    float temperature = 0.8f;
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float repeat_penalty = 1.0f;
    int32_t repeat_last_n = 64;
    uint32_t seed = 0;
    bool ignore_eos = false;  // end-of-generation tokens are never sampled (llama.cpp's --ignore-eos)
};

class Engine {
  public:
    Engine(const std::string & path, uint32_t n_ctx, int32_t n_threads, uint32_t n_batch, bool repack) {
        backend_init_once();
        take_log_tail();  // drop what earlier loads left
        llama_model_params mparams = llama_model_default_params();
        mparams.use_extra_bufts = repack;
        {
            py::gil_scoped_release release;
            model_ = llama_model_load_from_file(path.c_str(), mparams);
        }
        if (!model_) {
            throw std::runtime_error(path + ": llama.cpp could not load the model" + with_log());
        }
        vocab_ = llama_model_get_vocab(model_);
        llama_context_params cparams = llama_context_default_params();
        cparams.n_ctx = n_ctx;
        cparams.n_batch = n_batch;
        cparams.n_ubatch = std::min<uint32_t>(n_batch, 512);
        cparams.n_threads = n_threads;
        cparams.n_threads_batch = n_threads;
        cparams.no_perf = true;
        ctx_ = llama_init_from_model(model_, cparams);
        if (!ctx_) {
            llama_model_free(model_);
            model_ = nullptr;
            throw std::runtime_error(path + ": llama.cpp could not create a context of " + std::to_string(n_ctx) +
                                     " tokens" + with_log());
        }
    }

    ~Engine() { close(); }

    void close() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (sampler_) {
            llama_sampler_free(sampler_);
            sampler_ = nullptr;
        }
        if (ctx_) {
            llama_free(ctx_);
            ctx_ = nullptr;
        }
        if (model_) {
            llama_model_free(model_);
            model_ = nullptr;
        }
    }

    bool closed() const { return model_ == nullptr; }

    // --- vocabulary ------------------------------------------------------------------------------------------
    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const {
        check_open();
        int32_t n = -llama_tokenize(vocab_, text.data(), (int32_t) text.size(), nullptr, 0, add_special, parse_special);
        std::vector<llama_token> tokens(std::max(n, 0));
        if (n > 0) {
            const int32_t got = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), tokens.data(), n,
                                               add_special, parse_special);
            if (got != n) {
                throw std::runtime_error("tokenize: llama.cpp returned " + std::to_string(got) + " tokens, expected " +
                                         std::to_string(n));
            }
        }
        return tokens;
    }

    py::bytes token_to_piece(llama_token token, bool special) const {
        check_open();
        check_token(token);
        std::string piece(64, '\0');
        int32_t n = llama_token_to_piece(vocab_, token, piece.data(), (int32_t) piece.size(), 0, special);
        if (n < 0) {
            piece.resize(-n);
            n = llama_token_to_piece(vocab_, token, piece.data(), (int32_t) piece.size(), 0, special);
        }
        piece.resize(std::max(n, 0));
        return py::bytes(piece);
    }

    py::bytes detokenize(const std::vector<llama_token> & tokens, bool remove_special, bool unparse_special) const {
        check_open();
        for (llama_token t : tokens) {
            check_token(t);
        }
        std::string text(tokens.size() * 8 + 16, '\0');
        int32_t n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), text.data(), (int32_t) text.size(),
                                     remove_special, unparse_special);
        if (n < 0) {
            text.resize(-n);
            n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), text.data(), (int32_t) text.size(),
                                 remove_special, unparse_special);
        }
        text.resize(std::max(n, 0));
        return py::bytes(text);
    }

    bool is_eog(llama_token token) const { check_open(); return llama_vocab_is_eog(vocab_, token); }
    llama_token bos() const { check_open(); return llama_vocab_bos(vocab_); }
    llama_token eos() const { check_open(); return llama_vocab_eos(vocab_); }
    bool add_bos() const { check_open(); return llama_vocab_get_add_bos(vocab_); }
    int32_t n_vocab() const { check_open(); return llama_vocab_n_tokens(vocab_); }
    uint32_t n_ctx() const { check_open(); return llama_n_ctx(ctx_); }

    // the GGUF's tokenizer.chat_template, or None
    py::object chat_template() const {
        check_open();
        const char * tmpl = llama_model_chat_template(model_, nullptr);
        return tmpl ? py::object(py::str(tmpl)) : py::object(py::none());
    }

    py::dict metadata() const {
        check_open();
        py::dict out;
        const int32_t count = llama_model_meta_count(model_);
        std::vector<char> key(512), value(1 << 16);
        for (int32_t i = 0; i < count; ++i) {
            llama_model_meta_key_by_index(model_, i, key.data(), key.size());
            const int32_t n = llama_model_meta_val_str_by_index(model_, i, value.data(), value.size());
            if (n >= 0 && (size_t) n < value.size()) {
                out[py::str(key.data())] = py::str(std::string(value.data(), n));
            }
        }
        return out;
    }

    py::dict sizes() const {
        check_open();
        char desc[256];
        llama_model_desc(model_, desc, sizeof(desc));
        py::dict out;
        out["description"] = std::string(desc);
        out["n_params"] = llama_model_n_params(model_);
        out["size_bytes"] = llama_model_size(model_);
        out["n_ctx_train"] = llama_model_n_ctx_train(model_);
        out["n_embd"] = llama_model_n_embd(model_);
        out["n_layer"] = llama_model_n_layer(model_);
        out["n_vocab"] = llama_vocab_n_tokens(vocab_);
        out["n_ctx"] = llama_n_ctx(ctx_);
        return out;
    }

    // --- generation ------------------------------------------------------------------------------------------
    // Puts `tokens` into sequence 0 of the cache, reusing the longest prefix already there, and leaves the logits
    // of the last token ready for sample(). Returns how many tokens were reused.
    size_t prefill(const std::vector<llama_token> & tokens) {
        check_open();
        if (tokens.empty()) {
            throw std::invalid_argument("prefill: no tokens (an empty prompt needs a BOS token)");
        }
        check_fits(tokens.size(), "the prompt");
        for (llama_token t : tokens) {
            check_token(t);
        }
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(mutex_);
        size_t keep = 0;
        while (keep < cached_.size() && keep < tokens.size() && cached_[keep] == tokens[keep]) {
            ++keep;
        }
        keep = std::min(keep, tokens.size() - 1);  // the last token is decoded again for its logits
        llama_memory_t mem = llama_get_memory(ctx_);
        if (!llama_memory_seq_rm(mem, 0, (llama_pos) keep, -1)) {
            llama_memory_clear(mem, true);
            keep = 0;
        }
        cached_.resize(keep);
        decode_span(tokens, keep, tokens.size(), false);
        return keep;
    }

    void set_sampler(const SamplerSettings & s) {
        check_open();
        std::lock_guard<std::mutex> lock(mutex_);
        if (sampler_) {
            llama_sampler_free(sampler_);
        }
        llama_sampler_chain_params params = llama_sampler_chain_default_params();
        params.no_perf = true;
        sampler_ = llama_sampler_chain_init(params);
        if (s.ignore_eos) {
            std::vector<llama_logit_bias> bans;
            for (llama_token t = 0; t < llama_vocab_n_tokens(vocab_); ++t) {
                if (llama_vocab_is_eog(vocab_, t)) {
                    bans.push_back({ t, -INFINITY });
                }
            }
            llama_sampler_chain_add(sampler_, llama_sampler_init_logit_bias(llama_vocab_n_tokens(vocab_),
                                                                            (int32_t) bans.size(), bans.data()));
        }
        if (s.repeat_penalty != 1.0f) {
            llama_sampler_chain_add(sampler_, llama_sampler_init_penalties(llama_vocab_n_tokens(vocab_), s.repeat_last_n,
                                                                           s.repeat_penalty, 0.0f, 0.0f));
        }
        if (s.temperature <= 0.0f) {
            llama_sampler_chain_add(sampler_, llama_sampler_init_greedy());
        } else {
            if (s.top_k > 0) {
                llama_sampler_chain_add(sampler_, llama_sampler_init_top_k(s.top_k));
            }
            if (s.top_p < 1.0f) {
                llama_sampler_chain_add(sampler_, llama_sampler_init_top_p(s.top_p, 1));
            }
            if (s.min_p > 0.0f) {
                llama_sampler_chain_add(sampler_, llama_sampler_init_min_p(s.min_p, 1));
            }
            llama_sampler_chain_add(sampler_, llama_sampler_init_temp(s.temperature));
            llama_sampler_chain_add(sampler_, llama_sampler_init_dist(s.seed));
        }
        for (llama_token t : cached_) {  // the repetition penalty sees the prompt, as in llama-completion
            llama_sampler_accept(sampler_, t);
        }
    }

    // Samples the next token from the last logits; if it does not end generation, decodes it so that the next
    // call can sample again. Returns the token.
    llama_token step() {
        check_open();
        if (!sampler_) {
            throw std::logic_error("step: set_sampler() first");
        }
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(mutex_);
        if (cached_.empty()) {
            throw std::logic_error("step: prefill() first");
        }
        check_logits_finite();
        const llama_token token = llama_sampler_sample(sampler_, ctx_, -1);
        if (!llama_vocab_is_eog(vocab_, token) && cached_.size() < llama_n_ctx(ctx_)) {
            const std::vector<llama_token> one{ token };
            decode_span(one, 0, 1, false);
        }
        return token;
    }

    size_t n_cached() const { return cached_.size(); }

    // A NaN or +Inf among the logits to sample from (weights or scales that overflow in the file) is an error: the
    // samplers would pick a token anyway and the text would come out empty or wrong, with no sign of why.
    void check_logits_finite() {
        const float * logits = llama_get_logits_ith(ctx_, -1);
        const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
        const float * bad = std::find_if(logits, logits + n_vocab, [](float x) { return std::isnan(x) || x == INFINITY; });
        if (bad != logits + n_vocab) {
            throw std::runtime_error("the model's logits after " + std::to_string(cached_.size()) + " tokens are not "
                "finite (token " + std::to_string(bad - logits) + ": " + std::to_string(*bad) + "); the file's "
                "weights or scales overflow the arithmetic, nothing was sampled");
        }
    }

    // logits of every position of `tokens`, decoded from an empty cache: (n_tokens, n_vocab) float32
    py::array_t<float> logits(const std::vector<llama_token> & tokens) {
        check_open();
        check_fits(tokens.size(), "logits(): the tokens");
        for (llama_token t : tokens) {
            check_token(t);
        }
        const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
        py::array_t<float> out({(py::ssize_t) tokens.size(), (py::ssize_t) n_vocab});
        float * dst = out.mutable_data();
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(mutex_);
        decode_all_logits(tokens, dst);
        return out;
    }

    // llama-perplexity's protocol over `tokens` (already tokenized with the model's BOS rule): chunks of `chunk`
    // tokens, the first replaced by BOS when the vocabulary adds one, the second half of each chunk scored.
    // Returns the negative log-likelihood summed per chunk, and the number of scored tokens per chunk.
    std::pair<std::vector<double>, int> perplexity(std::vector<llama_token> tokens, int chunk, int n_chunks) {
        check_open();
        if (chunk < 4) {
            throw std::invalid_argument("perplexity: n_ctx must be at least 4, got " + std::to_string(chunk));
        }
        check_fits(chunk, "perplexity(): one chunk");
        const int available = (int) (tokens.size() / chunk);
        if (available < 1) {
            throw std::invalid_argument("perplexity: the text has " + std::to_string(tokens.size()) +
                                        " tokens, fewer than one chunk of " + std::to_string(chunk));
        }
        n_chunks = n_chunks < 0 ? available : std::min(n_chunks, available);
        const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
        const bool bos = llama_vocab_get_add_bos(vocab_);
        const int first = chunk / 2;
        std::vector<double> nll(n_chunks, 0.0);
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(mutex_);
        std::vector<float> chunk_logits((size_t) chunk * n_vocab);
        for (int c = 0; c < n_chunks; ++c) {
            std::vector<llama_token> window(tokens.begin() + (size_t) c * chunk, tokens.begin() + (size_t) (c + 1) * chunk);
            if (bos) {
                window[0] = llama_vocab_bos(vocab_);
            }
            decode_all_logits(window, chunk_logits.data());
            const llama_token * target = tokens.data() + (size_t) c * chunk;
            for (int i = first; i < chunk - 1; ++i) {
                const float * row = chunk_logits.data() + (size_t) i * n_vocab;
                const float max_logit = *std::max_element(row, row + n_vocab);
                double sum_exp = 0.0;
                for (int v = 0; v < n_vocab; ++v) {
                    sum_exp += expf(row[v] - max_logit);
                }
                nll[c] -= row[target[i + 1]] - max_logit - std::log(sum_exp);
            }
        }
        llama_memory_clear(llama_get_memory(ctx_), true);
        cached_.clear();
        return { nll, chunk - 1 - first };
    }

  private:
    llama_model * model_ = nullptr;
    llama_context * ctx_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    llama_sampler * sampler_ = nullptr;
    std::vector<llama_token> cached_;  // what sequence 0 of the cache holds
    std::mutex mutex_;

    static std::string with_log() {
        const std::string tail = take_log_tail();
        return tail.empty() ? std::string() : ":\n" + tail;
    }

    void check_open() const {
        if (!model_) {
            throw std::runtime_error("the model is closed");
        }
    }

    void check_token(llama_token t) const {
        if (t < 0 || t >= llama_vocab_n_tokens(vocab_)) {
            throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                                        std::to_string(llama_vocab_n_tokens(vocab_) - 1) + ")");
        }
    }

    void check_fits(size_t n, const char * what) const {
        if (n > llama_n_ctx(ctx_)) {
            throw std::length_error(std::string(what) + " needs " + std::to_string(n) +
                                    " tokens of context, more than n_ctx = " + std::to_string(llama_n_ctx(ctx_)));
        }
    }

    // every position's logits of `tokens` decoded from an empty cache, into dst (n_tokens x n_vocab)
    void decode_all_logits(const std::vector<llama_token> & tokens, float * dst) {
        const size_t n_vocab = llama_vocab_n_tokens(vocab_), n_batch = llama_n_batch(ctx_);
        llama_memory_clear(llama_get_memory(ctx_), true);
        cached_.clear();
        for (size_t begin = 0; begin < tokens.size(); begin += n_batch) {
            const size_t end = std::min(tokens.size(), begin + n_batch);
            decode_span(tokens, begin, end, true);
            for (size_t i = begin; i < end; ++i) {
                std::copy_n(llama_get_logits_ith(ctx_, (int32_t) (i - begin)), n_vocab, dst + i * n_vocab);
            }
        }
    }

    // decodes tokens[begin, end) at positions continuing the cache, in n_batch pieces; all_logits asks for every
    // position's logits (the caller's span must fit one batch), otherwise only the last one's
    void decode_span(const std::vector<llama_token> & tokens, size_t begin, size_t end, bool all_logits) {
        const size_t n_batch = llama_n_batch(ctx_);
        llama_batch batch = llama_batch_init((int32_t) std::min(n_batch, end - begin), 0, 1);
        try {
            for (size_t piece = begin; piece < end; piece += n_batch) {
                const size_t piece_end = std::min(end, piece + n_batch);
                batch.n_tokens = 0;
                for (size_t i = piece; i < piece_end; ++i) {
                    const int32_t k = batch.n_tokens++;
                    batch.token[k] = tokens[i];
                    batch.pos[k] = (llama_pos) cached_.size();
                    batch.n_seq_id[k] = 1;
                    batch.seq_id[k][0] = 0;
                    batch.logits[k] = all_logits || i + 1 == end;
                    cached_.push_back(tokens[i]);
                }
                const int32_t rc = llama_decode(ctx_, batch);
                if (rc != 0) {
                    throw std::runtime_error("llama_decode failed with code " + std::to_string(rc) + with_log());
                }
            }
        } catch (...) {
            llama_batch_free(batch);
            llama_memory_clear(llama_get_memory(ctx_), true);
            cached_.clear();
            throw;
        }
        llama_batch_free(batch);
    }
};

// llama-quantize's own work, through libllama: a whole GGUF into one of a few ftypes (the converter's answering
// teacher: a Q8_0 copy of an F32 base file), so an installed wheel needs no llama-quantize binary
void quantize_file(const std::string & src, const std::string & dst, const std::string & type, int n_threads) {
    static const std::pair<const char *, llama_ftype> ftypes[] = {
        {"F16", LLAMA_FTYPE_MOSTLY_F16}, {"Q8_0", LLAMA_FTYPE_MOSTLY_Q8_0}, {"Q4_0", LLAMA_FTYPE_MOSTLY_Q4_0}};
    const llama_ftype * ftype = nullptr;
    std::string known;
    for (const auto & [name, value] : ftypes) {
        known += std::string(known.empty() ? "" : ", ") + name;
        if (type == name) {
            ftype = &value;
        }
    }
    if (ftype == nullptr) {
        throw std::invalid_argument("quantize_file: type '" + type + "' is not one of " + known);
    }
    backend_init_once();
    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.ftype = *ftype;
    params.nthread = n_threads;
    uint32_t rc;
    {
        py::gil_scoped_release release;
        rc = llama_model_quantize(src.c_str(), dst.c_str(), &params);
    }
    if (rc != 0) {
        std::string tail = take_log_tail();
        throw std::runtime_error(src + ": libllama could not quantize it to " + type + (tail.empty() ? "" : ":\n" + tail));
    }
}

}  // namespace

void register_engine(py::module_ & m) {
    py::class_<SamplerSettings>(m, "SamplerSettings")
        .def(py::init<>())
        .def_readwrite("temperature", &SamplerSettings::temperature)
        .def_readwrite("top_k", &SamplerSettings::top_k)
        .def_readwrite("top_p", &SamplerSettings::top_p)
        .def_readwrite("min_p", &SamplerSettings::min_p)
        .def_readwrite("repeat_penalty", &SamplerSettings::repeat_penalty)
        .def_readwrite("repeat_last_n", &SamplerSettings::repeat_last_n)
        .def_readwrite("seed", &SamplerSettings::seed)
        .def_readwrite("ignore_eos", &SamplerSettings::ignore_eos);

    py::class_<Engine>(m, "Engine", "one model and context of the patched libllama (use nanoquant.Model)")
        .def(py::init<const std::string &, uint32_t, int32_t, uint32_t, bool>(), py::arg("path"), py::arg("n_ctx"),
             py::arg("n_threads"), py::arg("n_batch"), py::arg("repack") = true)
        .def("close", &Engine::close)
        .def_property_readonly("closed", &Engine::closed)
        .def("tokenize", &Engine::tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"))
        .def("token_to_piece", &Engine::token_to_piece, py::arg("token"), py::arg("special"))
        .def("detokenize", &Engine::detokenize, py::arg("tokens"), py::arg("remove_special"),
             py::arg("unparse_special"))
        .def("is_eog", &Engine::is_eog)
        .def_property_readonly("bos", &Engine::bos)
        .def_property_readonly("eos", &Engine::eos)
        .def_property_readonly("add_bos", &Engine::add_bos)
        .def_property_readonly("n_vocab", &Engine::n_vocab)
        .def_property_readonly("n_ctx", &Engine::n_ctx)
        .def_property_readonly("n_cached", &Engine::n_cached)
        .def("metadata", &Engine::metadata)
        .def("chat_template", &Engine::chat_template)
        .def("sizes", &Engine::sizes)
        .def("prefill", &Engine::prefill, py::arg("tokens"))
        .def("set_sampler", &Engine::set_sampler, py::arg("settings"))
        .def("step", &Engine::step)
        .def("logits", &Engine::logits, py::arg("tokens"))
        .def("perplexity", &Engine::perplexity, py::arg("tokens"), py::arg("n_ctx"), py::arg("n_chunks"));

    m.def("quantize_file", &quantize_file, py::arg("src"), py::arg("dst"), py::arg("type"), py::arg("n_threads") = 0,
          "a GGUF file quantized as llama-quantize SRC DST TYPE does (TYPE: F16, Q8_0 or Q4_0)");
    m.def("set_llama_log_verbose", &set_verbose, py::arg("verbose"),
          "print llama.cpp's log on stderr (it is kept quiet, and its last warnings are quoted in exceptions)");
}
