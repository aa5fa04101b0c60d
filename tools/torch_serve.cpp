// SPDX-License-Identifier: MIT
/*
 * tensoralloc-torch-serve: a C++ inference server's model switching on
 * libtorch, with tensoralloc linked (no preload). It serves requests round
 * robin over TorchScript models under a memory budget for their weights,
 * evicting the least recently used, and reports per request the time of
 * a switch (load and first forward), the RSS after each eviction, and
 * whether every output of a model is the same. docs/cpp.md.
 *
 *   --allocator tensoralloc  PyTorch's CPU allocator is tensoralloc's
 *                            (ta_torch_install: c10::SetCPUAllocator)
 *   --allocator default      PyTorch's own (the C library's malloc)
 *   --weights jit            torch::jit::load of MODEL.pt when a request
 *                            needs it; dropped on eviction
 *   --weights cache          the TorchScript files loaded once, their
 *                            weights unbound; each model's weights come
 *                            from MODEL.safetensors through ta_cache
 *                            (parallel readers, the cache's budget) and
 *                            are bound as tensors over the cache's memory
 *                            (tensoralloc::entry_tensors, no copy); an
 *                            eviction unbinds them and removes the entry
 *
 * Also built by the consumers test from an install prefix, with CMake
 * (tests/consumers/torch): only the installed headers are used here.
 */
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <tensoralloc.h>
#include <tensoralloc_cache.h>
#include <tensoralloc_torch.h>
#include <tensoralloc_torch_cache.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <list>
#include <map>
#include <string>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace {

const char usage_text[] =
    "usage: tensoralloc-torch-serve [OPTIONS] MODEL.pt...\n"
    "\n"
    "Serves requests round robin over the TorchScript models, their weights\n"
    "under a budget (least recently used evicted), and prints a line per\n"
    "request and a summary.\n"
    "\n"
    "  --allocator tensoralloc|default  PyTorch's CPU allocator (default tensoralloc)\n"
    "  --weights jit|cache     jit: torch::jit::load when needed; cache: weights\n"
    "                          from MODEL.safetensors through ta_cache, no copy\n"
    "                          (default jit)\n"
    "  --budget-mib N          memory for weights (default 1024)\n"
    "  --requests N            requests (default twice the models)\n"
    "  --input FILE:DIMS       raw float32 input, e.g. in.bin:1x3x64x64\n"
    "                          (default: ones of 1x3x64x64)\n"
    "  --outputs DIR           write each model's output, raw float32, to DIR/NAME.out\n"
    "  --threads N             at::set_num_threads (default 1)\n"
    "  --load-threads N        reader threads per cache load (default 0: one per core)\n"
    "  -h, --help              this help\n";

struct Options {
    bool tensoralloc = true;
    bool cache_weights = false;
    size_t budget = size_t(1024) << 20;
    long requests = -1;
    std::string input_file;
    std::vector<int64_t> input_shape{1, 3, 64, 64};
    std::string outputs;
    int threads = 1;
    int load_threads = 0;
    std::vector<std::string> models;
};

[[noreturn]] void usage_error(const std::string &message)
{
    std::fprintf(stderr, "tensoralloc-torch-serve: %s\n%s", message.c_str(), usage_text);
    std::exit(2);
}

long parse_count(const char *option, const char *text, long least, long most = 1L << 30)
{
    char *end;
    errno = 0;
    long v = std::strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < least || v > most)
        usage_error(std::string(option) + " takes a whole number from " + std::to_string(least) +
                    " to " + std::to_string(most) + ", not '" + text + "'");
    return v;
}

std::vector<int64_t> parse_dims(const std::string &text)
{
    std::vector<int64_t> dims;
    size_t at = 0;
    while (at <= text.size()) {
        size_t x = text.find('x', at);
        std::string part = text.substr(at, x == std::string::npos ? std::string::npos : x - at);
        dims.push_back(parse_count("--input", part.c_str(), 1));
        if (x == std::string::npos)
            break;
        at = x + 1;
    }
    return dims;
}

Options parse_options(int argc, char **argv)
{
    Options o;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&]() -> const char * {
            if (i + 1 >= argc)
                usage_error(a + " needs a value");
            return argv[++i];
        };
        if (a == "-h" || a == "--help") {
            std::fputs(usage_text, stdout);
            std::exit(0);
        } else if (a == "--allocator") {
            std::string v = value();
            if (v != "tensoralloc" && v != "default")
                usage_error("--allocator takes tensoralloc or default, not '" + v + "'");
            o.tensoralloc = v == "tensoralloc";
        } else if (a == "--weights") {
            std::string v = value();
            if (v != "jit" && v != "cache")
                usage_error("--weights takes jit or cache, not '" + v + "'");
            o.cache_weights = v == "cache";
        } else if (a == "--budget-mib") {
            o.budget = size_t(parse_count("--budget-mib", value(), 1)) << 20;
        } else if (a == "--requests") {
            o.requests = parse_count("--requests", value(), 1);
        } else if (a == "--input") {
            std::string v = value();
            size_t colon = v.rfind(':');
            if (colon == std::string::npos || colon == 0)
                usage_error("--input takes FILE:DIMS, e.g. in.bin:1x3x64x64, not '" + v + "'");
            o.input_file = v.substr(0, colon);
            o.input_shape = parse_dims(v.substr(colon + 1));
        } else if (a == "--outputs") {
            o.outputs = value();
        } else if (a == "--threads") {
            o.threads = int(parse_count("--threads", value(), 1, 4096));
        } else if (a == "--load-threads") {
            o.load_threads = int(parse_count("--load-threads", value(), 0, 4096));
        } else if (a.size() > 1 && a[0] == '-') {
            usage_error("unknown option " + a);
        } else {
            o.models.push_back(a);
        }
    }
    if (o.models.empty())
        usage_error("no model given");
    if (o.requests < 0)
        o.requests = long(2 * o.models.size());
    return o;
}

double now_ms()
{
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

double rss_mib()
{
    long pages = 0, resident = 0;
    FILE *f = std::fopen("/proc/self/statm", "r");
    if (f != nullptr) {
        if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2)
            resident = 0;
        std::fclose(f);
    }
    return double(resident) * double(sysconf(_SC_PAGESIZE)) / (1 << 20);
}

size_t file_bytes(const std::string &path)
{
    struct stat st;
    if (stat(path.c_str(), &st) != 0)
        throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
    return size_t(st.st_size);
}

// The path less its file name's extension ("dir/m.pt" -> "dir/m").
std::string without_extension(const std::string &path)
{
    size_t slash = path.rfind('/'), dot = path.rfind('.');
    bool has = dot != std::string::npos && (slash == std::string::npos || dot > slash);
    return has ? path.substr(0, dot) : path;
}

// A model's name: its file name less the extension.
std::string stem(const std::string &path)
{
    std::string base = without_extension(path);
    size_t slash = base.rfind('/');
    return slash == std::string::npos ? base : base.substr(slash + 1);
}

// MODEL.pt's weights: MODEL.safetensors beside it.
std::string weights_file(const std::string &model)
{
    return without_extension(model) + ".safetensors";
}

// The tensors of a module that a state_dict holds, by their dotted names.
std::map<std::string, at::Tensor> named_weights(const torch::jit::Module &m)
{
    std::map<std::string, at::Tensor> out;
    for (const auto &p : m.named_parameters(true))
        out.emplace(p.name, p.value);
    for (const auto &b : m.named_buffers(true))
        out.emplace(b.name, b.value);
    return out;
}

struct Slot {
    at::Tensor tensor; // the module's own: set_data rebinds it
    std::vector<int64_t> shape;
};

struct Model {
    std::string name, path;
    size_t bytes = 0;                  // what it charges to the budget
    bool resident = false;             // weights in memory, ready to run
    torch::jit::Module module;         // jit: loaded when resident; cache: always
    std::map<std::string, Slot> slots; // cache: the module's weight tensors
    at::Tensor first_output;
};

class Server {
  public:
    explicit Server(const Options &o) : opt_(o)
    {
        if (opt_.cache_weights) {
            ta_cache_config_t config = {};
            config.size = sizeof config;
            config.ram_budget = opt_.budget;
            config.overflow = TA_OVERFLOW_REFUSE;
            config.load_threads = opt_.load_threads;
            int rc = ta_cache_create(&config, &cache_);
            if (rc != 0)
                throw std::runtime_error("ta_cache_create: " + std::string(std::strerror(rc)));
        }
        for (const auto &path : opt_.models) {
            Model m;
            m.name = stem(path);
            m.path = path;
            if (opt_.cache_weights) {
                // The graph once; its weights unbound (their storage freed)
                // until the cache's are bound.
                m.module = torch::jit::load(path);
                m.module.eval();
                for (auto &w : named_weights(m.module))
                    m.slots.emplace(w.first, Slot{w.second, w.second.sizes().vec()});
                unbind(m);
                m.bytes = file_bytes(weights_file(path));
            } else {
                m.bytes = file_bytes(path);
            }
            models_.push_back(std::move(m));
        }
    }

    ~Server()
    {
        models_.clear(); // every tensor over the cache's entries first
        if (cache_ != nullptr)
            ta_cache_destroy(cache_);
    }

    // One request: the model made resident (evicting others), then run.
    void serve(long index, const at::Tensor &input)
    {
        Model &m = models_[size_t(index) % models_.size()];
        bool hit = m.resident;
        double rss_after_evict = -1, t0 = now_ms(), load_ms = 0;
        int evicted = 0;
        if (!hit) {
            while (used_ + m.bytes > opt_.budget && !lru_.empty()) {
                evict(*lru_.front());
                evicted++;
            }
            if (evicted > 0)
                rss_after_evict = rss_mib();
            t0 = now_ms();
            make_resident(m);
            load_ms = now_ms() - t0;
        }
        lru_.remove(&m);
        lru_.push_back(&m);
        at::Tensor out;
        {
            torch::NoGradGuard no_grad;
            out = m.module.forward({input}).toTensor().contiguous();
        }
        double forward_ms = now_ms() - t0 - load_ms;
        if (!m.first_output.defined()) {
            m.first_output = out.clone();
            write_output(m);
        } else if (!torch::equal(out, m.first_output)) {
            mismatches_++;
        }
        if (!hit) {
            switches_++;
            switch_ms_.push_back(load_ms + forward_ms);
        }
        evictions_ += evicted;
        std::printf("request %ld model %s hit %d load_ms %.2f forward_ms %.2f evicted %d "
                    "rss_after_evict_mib %.1f rss_mib %.1f\n",
                    index, m.name.c_str(), hit ? 1 : 0, load_ms, forward_ms, evicted,
                    rss_after_evict, rss_mib());
    }

    void summary(double start_rss)
    {
        std::vector<double> s = switch_ms_;
        std::sort(s.begin(), s.end());
        double median = s.empty() ? 0 : s[s.size() / 2], total = 0;
        for (double v : s)
            total += v;
        double end_rss = rss_mib();
        for (auto &m : models_)
            if (m.resident)
                evict(m);
        double dropped_rss = rss_mib();
        std::this_thread::sleep_for(std::chrono::seconds(1));
        double later_rss = rss_mib();
        ta_stats_t st = {};
        st.size = sizeof st;
        ta_stats_get(&st);
        std::printf("summary allocator %s weights %s requests %ld switches %ld "
                    "switch_ms_median %.2f switch_ms_total %.1f evictions %ld mismatches %ld "
                    "rss_start_mib %.1f rss_end_mib %.1f rss_dropped_mib %.1f "
                    "rss_dropped_1s_mib %.1f ta_large_allocs %llu\n",
                    opt_.tensoralloc ? "tensoralloc" : "default",
                    opt_.cache_weights ? "cache" : "jit", opt_.requests, switches_, median, total,
                    evictions_, mismatches_, start_rss, end_rss, dropped_rss, later_rss,
                    (unsigned long long)st.large_alloc_count);
    }

    long mismatches() const { return mismatches_; }

  private:
    void make_resident(Model &m)
    {
        if (!opt_.cache_weights) {
            m.module = torch::jit::load(m.path);
            m.module.eval();
        } else {
            ta_entry_t *entry;
            std::string file = weights_file(m.path);
            int rc = ta_cache_get(cache_, m.name.c_str(), &entry);
            if (rc == ENOENT)
                rc = ta_cache_load_safetensors(cache_, m.name.c_str(), file.c_str(), &entry);
            if (rc != 0) {
                const char *message = nullptr;
                ta_cache_last_error(&message);
                throw std::runtime_error("loading " + file + ": " +
                                         (message ? message : std::strerror(rc)));
            }
            tensoralloc::NamedTensors weights;
            rc = tensoralloc::entry_tensors(entry, &weights); // the lock is theirs now
            if (rc != 0)
                throw std::runtime_error("entry_tensors(" + m.name + "): " + std::strerror(rc));
            bind(m, weights);
        }
        m.resident = true;
        used_ += m.bytes;
    }

    // The cache's tensors into the module's slots, checked name by name.
    static void bind(Model &m, const tensoralloc::NamedTensors &weights)
    {
        if (weights.size() != m.slots.size())
            throw std::runtime_error(m.name + ": " + std::to_string(weights.size()) +
                                     " tensors in its weights file, " +
                                     std::to_string(m.slots.size()) + " in the model");
        for (const auto &w : weights) {
            auto slot = m.slots.find(w.first);
            if (slot == m.slots.end())
                throw std::runtime_error(m.name + ": the model has no tensor " + w.first);
            if (slot->second.tensor.scalar_type() != w.second.scalar_type() ||
                w.second.sizes().vec() != slot->second.shape)
                throw std::runtime_error(m.name + ": " + w.first +
                                         " has another type or shape in its weights file");
        }
        for (const auto &w : weights) {
            at::Tensor &slot = m.slots.at(w.first).tensor;
            slot.set_data(w.second);
            if (slot.data_ptr() != w.second.data_ptr()) // the point: no copy
                throw std::runtime_error(m.name + ": " + w.first + " was copied");
        }
    }

    // Empty tensors in the slots: the weights' storage goes.
    static void unbind(Model &m)
    {
        for (auto &slot : m.slots)
            slot.second.tensor.set_data(at::empty({0}, slot.second.tensor.options()));
    }

    void evict(Model &m)
    {
        if (!opt_.cache_weights) {
            m.module = torch::jit::Module(); // the weights go with the last reference
        } else {
            unbind(m);
            // The last tensor over the entry is gone: it is unlocked.
            int rc = ta_cache_remove(cache_, m.name.c_str());
            if (rc != 0)
                throw std::runtime_error("ta_cache_remove(" + m.name + "): " + std::strerror(rc));
        }
        m.resident = false;
        used_ -= m.bytes;
        lru_.remove(&m);
    }

    void write_output(const Model &m) const
    {
        if (opt_.outputs.empty())
            return;
        at::Tensor f = m.first_output.to(at::kFloat).contiguous();
        std::string path = opt_.outputs + "/" + m.name + ".out";
        std::ofstream out(path, std::ios::binary);
        out.write(static_cast<const char *>(f.data_ptr()), std::streamsize(f.nbytes()));
        if (!out)
            throw std::runtime_error("cannot write " + path);
    }

    const Options &opt_;
    ta_cache_t *cache_ = nullptr;
    std::vector<Model> models_;
    std::list<Model *> lru_;
    size_t used_ = 0;
    long switches_ = 0, evictions_ = 0, mismatches_ = 0;
    std::vector<double> switch_ms_;
};

at::Tensor read_input(const Options &o)
{
    if (o.input_file.empty())
        return torch::ones(o.input_shape);
    at::Tensor t = torch::empty(o.input_shape);
    std::ifstream in(o.input_file, std::ios::binary);
    in.read(static_cast<char *>(t.data_ptr()), std::streamsize(t.nbytes()));
    if (!in || in.peek() != EOF)
        throw std::runtime_error(o.input_file + " does not hold " + std::to_string(t.nbytes()) +
                                 " bytes of float32 for the shape given");
    return t;
}

} // namespace

int main(int argc, char **argv)
{
    Options opt = parse_options(argc, argv);
    if (opt.tensoralloc) {
        int rc = ta_torch_install();
        if (rc != 0) {
            std::fprintf(stderr, "tensoralloc-torch-serve: ta_torch_install: %s\n",
                         std::strerror(rc));
            return 1;
        }
    }
    at::set_num_threads(opt.threads);
    try {
        at::Tensor input = read_input(opt);
        double start_rss = rss_mib(); // libtorch loaded, no model yet
        Server server(opt);
        for (long r = 0; r < opt.requests; r++)
            server.serve(r, input);
        server.summary(start_rss);
        return server.mismatches() == 0 ? 0 : 3;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "tensoralloc-torch-serve: %s\n", e.what());
        return 1;
    }
}
