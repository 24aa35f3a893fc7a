// ftlm._text: the data preparation's per-character work in C++ (quality rules and MinHash signatures).
//
// A plain CPython extension (no torch, no numpy headers): a data worker loads it without importing torch. Every
// argument is a contiguous buffer the Python side made (ftlm/data/native.py), and every table that defines a
// character class (Python's whitespace, the LETTER / HANGUL / LATIN regexes, the MinHash word characters) is built
// from the Python definition and passed in, so there is one definition of each and the numpy reference paths in
// ftlm/data/clean.py and ftlm/data/minhash.py give the same answers (tests/data/test_native.py compares them).
//
// Work is per document and allocation-free after warm-up; the GIL is released while it runs.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

using u8 = uint8_t;
using u32 = uint32_t;
using u64 = uint64_t;

inline u64 mix(u64 x) {  // splitmix64 finaliser, as ftlm.data.minhash._mix
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// FNV-1a over a run of code points, its length mixed in: the key of a word, a line or a unit in the hash tables
// below (compared by key only where the numpy reference also compares 64-bit hashes).
inline u64 hash_run(const u32* s, Py_ssize_t n) {
  u64 h = 0xCBF29CE484222325ULL;
  for (Py_ssize_t i = 0; i < n; ++i) h = (h ^ s[i]) * 0x100000001B3ULL;
  return mix(h ^ static_cast<u64>(n));
}

// The whitespace that separates the tokenize stage's units (encode._UNITS).
inline bool split_space(u32 c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// A read-only view of a Python buffer with a checked element size.
template <typename T>
struct View {
  Py_buffer buffer{};
  const T* data = nullptr;
  Py_ssize_t size = 0;
  bool ok = false;
  View(PyObject* object, const char* name) {
    if (PyObject_GetBuffer(object, &buffer, PyBUF_C_CONTIGUOUS) != 0) return;
    if (buffer.len % static_cast<Py_ssize_t>(sizeof(T)) != 0) {
      PyErr_Format(PyExc_ValueError, "ftlm._text: %s has %zd bytes, not a whole number of %zu-byte items", name,
                   buffer.len, sizeof(T));
      return;
    }
    data = static_cast<const T*>(buffer.buf);
    size = buffer.len / static_cast<Py_ssize_t>(sizeof(T));
    ok = true;
  }
  ~View() {
    if (buffer.obj != nullptr) PyBuffer_Release(&buffer);
  }
  View(const View&) = delete;
  View& operator=(const View&) = delete;
};

// A bytes object with a container's contents (Python makes a numpy view of it). NULL with the error set on failure,
// which Py_BuildValue's "N" passes on (releasing the other "N" arguments).
template <typename Container>
PyObject* as_bytes(const Container& c) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(c.data()),
                                   static_cast<Py_ssize_t>(c.size() * sizeof(typename Container::value_type)));
}

PyObject* new_bytes(Py_ssize_t n, char** out) {
  PyObject* bytes = PyBytes_FromStringAndSize(nullptr, n);
  if (bytes != nullptr) *out = PyBytes_AS_STRING(bytes);
  return bytes;
}

// -- MinHash -------------------------------------------------------------------------------------------------------
// Same arithmetic as ftlm.data.minhash.shingle_hashes + signatures: a word is a maximal run of word characters, its
// hash the polynomial sum(c_i * 0x100000001B3^(end-1-i)) (Horner's rule gives the same value mod 2^64) mixed with
// its length; a shingle is `ngram` consecutive words of one document combined by x * golden + h, mixed; a document
// with 1..ngram-1 words has one shingle of all of them. Documents are separated by NUL in `codes`.
// Word characters: a table over the BMP built from minhash.word_mask; every code point above it is one.
inline bool is_word(const u8* table, u32 c) { return c >= 0x10000 || table[c] != 0; }

// The loop over permutations is most of the work: built for AVX2 as well as the baseline, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
void sign_document(const std::vector<u64>& words, Py_ssize_t ngram, const u32* a, const u32* b, Py_ssize_t perms,
                   u32* sig) {
  constexpr u64 kShingle = 0x9E3779B97F4A7C15ULL;
  const Py_ssize_t n = static_cast<Py_ssize_t>(words.size());
  if (n == 0) return;  // keeps all 0xFFFFFFFF
  auto update = [&](u64 shingle) {
    const u32 x = static_cast<u32>(mix(shingle) >> 32);
    for (Py_ssize_t p = 0; p < perms; ++p) sig[p] = std::min(sig[p], a[p] * x + b[p]);  // wrapping uint32
  };
  if (n < ngram) {
    u64 acc = 0;
    for (u64 h : words) acc = acc * kShingle + h;
    update(acc);
    return;
  }
  for (Py_ssize_t i = 0; i + ngram <= n; ++i) {
    u64 acc = words[i];
    for (Py_ssize_t j = 1; j < ngram; ++j) acc = acc * kShingle + words[i + j];
    update(acc);
  }
}

PyObject* minhash(PyObject*, PyObject* args) {
  PyObject *codes_obj, *a_obj, *b_obj, *word_obj, *out_obj;
  Py_ssize_t n_docs, ngram;
  if (!PyArg_ParseTuple(args, "OnnOOOO", &codes_obj, &n_docs, &ngram, &a_obj, &b_obj, &word_obj, &out_obj))
    return nullptr;
  View<u32> codes(codes_obj, "codes");
  View<u32> a(a_obj, "a"), b(b_obj, "b");
  View<u8> word(word_obj, "word table");
  if (!codes.ok || !a.ok || !b.ok || !word.ok) return nullptr;
  const Py_ssize_t perms = a.size;
  if (b.size != perms || perms == 0 || word.size != 0x10000 || ngram < 1 || n_docs < 0) {
    PyErr_SetString(PyExc_ValueError, "ftlm._text.minhash: inconsistent arguments");
    return nullptr;
  }
  Py_buffer out_buffer;
  if (PyObject_GetBuffer(out_obj, &out_buffer, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) return nullptr;
  if (out_buffer.len != n_docs * perms * static_cast<Py_ssize_t>(sizeof(u32))) {
    PyBuffer_Release(&out_buffer);
    PyErr_Format(PyExc_ValueError, "ftlm._text.minhash: out must be (%zd, %zd) uint32", n_docs, perms);
    return nullptr;
  }
  u32* sigs = static_cast<u32*>(out_buffer.buf);
  bool too_many_docs = false;
  Py_BEGIN_ALLOW_THREADS;
  std::fill(sigs, sigs + n_docs * perms, 0xFFFFFFFFu);
  constexpr u64 kWordPrime = 0x100000001B3ULL;
  std::vector<u64> words;
  Py_ssize_t doc = 0;
  u64 h = 0, len = 0;
  auto end_word = [&]() {
    if (len) words.push_back(mix(h ^ len));
    h = 0;
    len = 0;
  };
  for (Py_ssize_t i = 0; i <= codes.size; ++i) {
    const u32 c = i < codes.size ? codes.data[i] : 0;
    if (c != 0 && is_word(word.data, c)) {
      h = h * kWordPrime + c;
      ++len;
      continue;
    }
    end_word();
    if (c == 0) {  // end of a document
      if (doc >= n_docs) {
        too_many_docs = !words.empty() || i < codes.size;
        if (too_many_docs) break;
      } else {
        sign_document(words, ngram, a.data, b.data, perms, sigs + doc * perms);
      }
      words.clear();
      ++doc;
    }
  }
  Py_END_ALLOW_THREADS;
  PyBuffer_Release(&out_buffer);
  if (too_many_docs) {
    PyErr_Format(PyExc_ValueError, "ftlm._text.minhash: codes hold more than the %zd documents given", n_docs);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// -- exact keys ----------------------------------------------------------------------------------------------------
// ftlm.data.dedup.exact_key hashes " ".join(text.lower().split()) with blake2b; this writes that canonical text of
// every document (codes already lower-cased, NUL between documents) as UTF-8, for hashlib to hash.
PyObject* canonical(PyObject*, PyObject* args) {
  PyObject *codes_obj, *space_obj;
  Py_ssize_t n_docs;
  if (!PyArg_ParseTuple(args, "OnO", &codes_obj, &n_docs, &space_obj)) return nullptr;
  View<u32> codes(codes_obj, "codes");
  View<u8> space(space_obj, "space table");
  if (!codes.ok || !space.ok) return nullptr;
  if (space.size != 0x10000 || n_docs < 1) {
    PyErr_SetString(PyExc_ValueError, "ftlm._text.canonical: needs n_docs >= 1 and a 65536-entry space table");
    return nullptr;
  }
  std::string text;
  std::vector<int64_t> offsets{0};
  bool bad_code = false, too_many_docs = false;
  Py_BEGIN_ALLOW_THREADS;
  text.reserve(static_cast<size_t>(codes.size) * 2);
  bool pending_space = false;  // a whitespace run after a word: written only if another word follows
  for (Py_ssize_t i = 0; i <= codes.size; ++i) {
    const u32 c = i < codes.size ? codes.data[i] : 0;
    if (c == 0) {
      if (static_cast<Py_ssize_t>(offsets.size()) > n_docs) {
        too_many_docs = true;
        break;
      }
      offsets.push_back(static_cast<int64_t>(text.size()));
      pending_space = false;
      continue;
    }
    if (c < 0x10000 && space.data[c]) {
      pending_space = static_cast<int64_t>(text.size()) > offsets.back();
      continue;
    }
    if (pending_space) text.push_back(' ');
    pending_space = false;
    if (c < 0x80) {
      text.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      text.push_back(static_cast<char>(0xC0 | (c >> 6)));
      text.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      text.push_back(static_cast<char>(0xE0 | (c >> 12)));
      text.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      text.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x110000) {
      text.push_back(static_cast<char>(0xF0 | (c >> 18)));
      text.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      text.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      text.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      bad_code = true;
      break;
    }
  }
  Py_END_ALLOW_THREADS;
  if (bad_code || too_many_docs || static_cast<Py_ssize_t>(offsets.size()) != n_docs + 1) {
    PyErr_Format(PyExc_ValueError, "ftlm._text.canonical: %s", bad_code ? "a code point above U+10FFFF"
                                                                         : "codes do not hold n_docs documents");
    return nullptr;
  }
  return Py_BuildValue("(NN)", as_bytes(text), as_bytes(offsets));
}

// -- quality rules -------------------------------------------------------------------------------------------------
// The rules of ftlm.data.clean.QualityFilter.reject_reasons except the language-ID one (Python's py3langid), with the
// same decisions: lines and n-grams are compared by 64-bit hashes (as the numpy path does), nothing else is
// approximate. Reason codes are 1 + the index in clean.FILTERS; 0 passes.
enum Reason : u8 {
  kPass = 0,
  kTooShort = 1,
  kTooLong = 2,
  kTooFewWords = 3,
  kLongWords = 4,
  kFewLetters = 5,
  kWrongLanguage = 6,
  kRepeatedLines = 8,
  kRepeatedNgrams = 9,
};

struct Rules {
  // NaN = the rule is off
  double min_chars, max_chars, min_words, max_mean_word_chars, min_letter_share, min_script_share, max_dup_line_frac,
      max_dup_line_char_frac;
  std::vector<std::pair<Py_ssize_t, double>> top;  // (n, max share of the most frequent n-gram)
  std::vector<std::pair<Py_ssize_t, double>> dup;  // (n, max share of characters in repeated n-grams), n ascending
};

inline bool on(double x) { return !std::isnan(x); }

// Counts of equal 64-bit keys with the first position of each: open addressing, cleared in O(1) by a generation.
class Counter {
 public:
  struct Slot {
    u64 key;
    int32_t count;
    int32_t first;
    u32 generation;
  };
  void reset(size_t n) {
    size_t capacity = 16;
    while (capacity < 2 * n) capacity *= 2;
    if (capacity > slots_.size()) {
      slots_.assign(capacity, Slot{0, 0, 0, 0});
      generation_ = 0;
    }
    mask_ = capacity - 1;  // a prefix of the table when it is bigger than needed
    if (++generation_ == 0) {  // wrapped: clear for real
      std::fill(slots_.begin(), slots_.end(), Slot{0, 0, 0, 0});
      generation_ = 1;
    }
    used_.clear();
  }
  Slot& add(u64 key, int32_t position) {
    size_t i = static_cast<size_t>(key) & mask_;
    while (true) {
      Slot& s = slots_[i];
      if (s.generation != generation_) {
        s = Slot{key, 1, position, generation_};
        used_.push_back(static_cast<u32>(i));
        return s;
      }
      if (s.key == key) {
        ++s.count;
        return s;
      }
      i = (i + 1) & mask_;
    }
  }
  const Slot& find(u64 key) const {
    size_t i = static_cast<size_t>(key) & mask_;
    while (slots_[i].key != key || slots_[i].generation != generation_) i = (i + 1) & mask_;
    return slots_[i];
  }
  const std::vector<u32>& used() const { return used_; }
  const Slot& at(u32 i) const { return slots_[i]; }

 private:
  std::vector<Slot> slots_;
  std::vector<u32> used_;
  size_t mask_ = 0;
  u32 generation_ = 0;
};

struct Tables {
  const u8* space;   // (0x10000,) str.isspace
  const u8* letter;  // (letter_size,) clean.LETTER
  Py_ssize_t letter_size;
  const u8* script;  // (0x10000,) 1: the stream's script, 2: letters its share leaves out (clean.NEUTRAL); or null
};

class Judge {
 public:
  Judge(const Rules& rules, const Tables& tables) : r_(rules), t_(tables) {}

  // -> reason code; `n_words` = len(text.split())
  u8 operator()(const u32* text, Py_ssize_t length, int64_t* n_words) {
    split_words(text, length);
    *n_words = static_cast<int64_t>(word_len_.size());
    const double L = static_cast<double>(length);
    if (on(r_.min_chars) && L < r_.min_chars) return kTooShort;
    if (on(r_.max_chars) && L > r_.max_chars) return kTooLong;
    const size_t W = word_len_.size();
    if (on(r_.min_words) && static_cast<double>(W) < r_.min_words) return kTooFewWords;
    if (on(r_.max_mean_word_chars) && W > 0 &&
        static_cast<double>(total_chars_) / static_cast<double>(W) > r_.max_mean_word_chars)
      return kLongWords;
    int64_t letters = 0, in_script = 0, neutral = 0, invisible = 0;
    for (Py_ssize_t i = 0; i < length; ++i) {
      const u32 c = text[i];
      letters += c < static_cast<u32>(t_.letter_size) ? t_.letter[c] : 0;
      if (t_.script != nullptr && c < 0x10000) {
        in_script += t_.script[c] == 1;
        neutral += t_.script[c] == 2;
      }
      invisible += (c == ' ') | (c == '\n') | (c == '\t');
    }
    const int64_t visible = std::max<int64_t>(length - invisible, 1);
    if (on(r_.min_letter_share) && static_cast<double>(letters) < r_.min_letter_share * static_cast<double>(visible))
      return kFewLetters;
    if (t_.script != nullptr && on(r_.min_script_share) &&
        static_cast<double>(in_script) <
            r_.min_script_share * static_cast<double>(std::max<int64_t>(letters - neutral, 1)))
      return kWrongLanguage;
    if (repeated_lines(text, length)) return kRepeatedLines;
    if (repeated_ngrams()) return kRepeatedNgrams;
    return kPass;
  }

 private:
  bool is_space(u32 c) const { return c < 0x10000 && t_.space[c]; }

  // text.split(): word hashes and lengths
  void split_words(const u32* text, Py_ssize_t length) {
    word_hash_.clear();
    word_len_.clear();
    total_chars_ = 0;
    Py_ssize_t i = 0;
    while (i < length) {
      while (i < length && is_space(text[i])) ++i;
      if (i == length) break;
      const Py_ssize_t start = i;
      while (i < length && !is_space(text[i])) ++i;
      const int64_t n = i - start;
      word_hash_.push_back(hash_run(text + start, n));
      word_len_.push_back(n);
      total_chars_ += n;
    }
  }

  // clean.QualityFilter._repeated_lines: lines of text.split("\n") that hold a non-space character, compared whole
  bool repeated_lines(const u32* text, Py_ssize_t length) {
    line_hash_.clear();
    line_len_.clear();
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i <= length; ++i) {
      if (i < length && text[i] != '\n') continue;
      bool blank = true;
      for (Py_ssize_t k = start; k < i && blank; ++k) blank = is_space(text[k]);
      if (!blank) {
        line_hash_.push_back(hash_run(text + start, i - start));
        line_len_.push_back(i - start);
      }
      start = i + 1;
    }
    const size_t n = line_hash_.size();
    if (n < 2) return false;
    counter_.reset(n);
    for (size_t k = 0; k < n; ++k) counter_.add(line_hash_[k], static_cast<int32_t>(k));
    if (counter_.used().size() == n) return false;  // no line repeats
    int64_t dup_lines = 0, dup_chars = 0, chars = 0;
    for (size_t k = 0; k < n; ++k) {
      chars += line_len_[k];
      if (counter_.find(line_hash_[k]).count > 1) {
        ++dup_lines;
        dup_chars += line_len_[k];
      }
    }
    if (on(r_.max_dup_line_frac) && static_cast<double>(dup_lines) > r_.max_dup_line_frac * static_cast<double>(n))
      return true;
    return on(r_.max_dup_line_char_frac) &&
           static_cast<double>(dup_chars) > r_.max_dup_line_char_frac * static_cast<double>(chars);
  }

  // n-gram hashes of the words: gram_[i] = words i..i+n-1
  void grams(size_t n) {
    constexpr u64 kGram = 0x9E3779B97F4A7C15ULL;
    const size_t W = word_hash_.size();
    gram_.resize(W - n + 1);
    for (size_t i = 0; i + n <= W; ++i) {
      u64 acc = word_hash_[i];
      for (size_t j = 1; j < n; ++j) acc = acc * kGram + word_hash_[i + j];
      gram_[i] = mix(acc);
    }
    counter_.reset(gram_.size());
    for (size_t i = 0; i < gram_.size(); ++i) counter_.add(gram_[i], static_cast<int32_t>(i));
  }

  // clean._NGramRules.repeated for one document
  bool repeated_ngrams() {
    const size_t W = word_hash_.size();
    if (total_chars_ == 0) return false;
    const double total = static_cast<double>(total_chars_);
    for (const auto& [n, limit] : r_.top) {
      if (W < 2 * static_cast<size_t>(n)) continue;
      grams(n);
      // the most frequent n-gram; among equally frequent ones the one seen first (Counter.most_common's order)
      int32_t top = 0, best = 0;
      for (u32 slot : counter_.used()) {
        const auto& s = counter_.at(slot);
        if (s.count > top || (s.count == top && s.first < best)) {
          top = s.count;
          best = s.first;
        }
      }
      if (top <= 1) continue;
      int64_t chars = 0;
      for (Py_ssize_t k = 0; k < n; ++k) chars += word_len_[best + k];
      if (static_cast<double>(static_cast<int64_t>(top) * chars) > limit * total) return true;
    }
    // The share covered by repeated n-grams only shrinks as n grows: stop once it is under every remaining limit.
    for (size_t index = 0; index < r_.dup.size(); ++index) {
      const auto [n, limit] = r_.dup[index];
      if (W < 2 * static_cast<size_t>(n)) continue;
      grams(n);
      int64_t covered = 0;
      size_t until = 0;  // words before this index are covered by a repeated n-gram
      for (size_t i = 0; i < W; ++i) {
        if (i + n <= W && counter_.find(gram_[i]).count > 1) until = std::max(until, i + n);
        if (i < until) covered += word_len_[i];
      }
      const double share = static_cast<double>(covered) / total;
      if (share > limit) return true;
      double rest = limit;
      for (size_t k = index; k < r_.dup.size(); ++k) rest = std::min(rest, r_.dup[k].second);
      if (share <= rest) return false;
    }
    return false;
  }

  const Rules& r_;
  const Tables& t_;
  std::vector<u64> word_hash_, line_hash_, gram_;
  std::vector<int64_t> word_len_, line_len_;
  int64_t total_chars_ = 0;
  Counter counter_;
};

bool read_pairs(PyObject* object, const char* name, std::vector<std::pair<Py_ssize_t, double>>* out) {
  View<double> v(object, name);
  if (!v.ok) return false;
  if (v.size % 2 != 0) {
    PyErr_Format(PyExc_ValueError, "ftlm._text.quality: %s must hold (n, limit) pairs", name);
    return false;
  }
  for (Py_ssize_t i = 0; i < v.size; i += 2) {
    const auto n = static_cast<Py_ssize_t>(v.data[i]);
    if (n < 1) {
      PyErr_Format(PyExc_ValueError, "ftlm._text.quality: %s has n-gram size %zd", name, n);
      return false;
    }
    out->emplace_back(n, v.data[i + 1]);
  }
  return true;
}

PyObject* quality(PyObject*, PyObject* args) {
  PyObject *codes_obj, *offsets_obj, *space_obj, *letter_obj, *script_obj, *top_obj, *dup_obj;
  Rules rules;
  if (!PyArg_ParseTuple(args, "OOOOO(dddddddd)OO", &codes_obj, &offsets_obj, &space_obj, &letter_obj, &script_obj,
                        &rules.min_chars, &rules.max_chars, &rules.min_words, &rules.max_mean_word_chars,
                        &rules.min_letter_share, &rules.min_script_share, &rules.max_dup_line_frac,
                        &rules.max_dup_line_char_frac, &top_obj, &dup_obj))
    return nullptr;
  View<u32> codes(codes_obj, "codes");
  View<int64_t> offsets(offsets_obj, "offsets");
  View<u8> space(space_obj, "space table"), letter(letter_obj, "letter table");
  if (!codes.ok || !offsets.ok || !space.ok || !letter.ok) return nullptr;
  if (!read_pairs(top_obj, "top n-gram limits", &rules.top) || !read_pairs(dup_obj, "repeated n-gram limits", &rules.dup))
    return nullptr;
  std::sort(rules.dup.begin(), rules.dup.end());
  const u8* script = nullptr;
  std::optional<View<u8>> script_view;
  if (script_obj != Py_None) {
    script_view.emplace(script_obj, "script table");
    if (!script_view->ok) return nullptr;
    if (script_view->size != 0x10000) {
      PyErr_SetString(PyExc_ValueError, "ftlm._text.quality: the script table needs 65536 entries");
      return nullptr;
    }
    script = script_view->data;
  }
  const Py_ssize_t n_docs = offsets.size - 1;
  bool bad_offsets = n_docs < 0 || space.size != 0x10000;
  for (Py_ssize_t d = 0; !bad_offsets && d < n_docs; ++d)
    bad_offsets = offsets.data[d] < 0 || offsets.data[d] > offsets.data[d + 1] || offsets.data[d + 1] > codes.size;
  if (bad_offsets) {
    PyErr_SetString(PyExc_ValueError, "ftlm._text.quality: offsets must rise from 0 within the codes; space: 65536");
    return nullptr;
  }
  char *reasons_raw = nullptr, *words_raw = nullptr;
  PyObject* reasons = new_bytes(n_docs, &reasons_raw);
  PyObject* words = new_bytes(n_docs * static_cast<Py_ssize_t>(sizeof(int64_t)), &words_raw);
  if (reasons == nullptr || words == nullptr) {
    Py_XDECREF(reasons);
    Py_XDECREF(words);
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS;
  const Tables tables{space.data, letter.data, letter.size, script};
  Judge judge(rules, tables);
  int64_t* n_words = reinterpret_cast<int64_t*>(words_raw);
  for (Py_ssize_t d = 0; d < n_docs; ++d)
    reasons_raw[d] = static_cast<char>(
        judge(codes.data + offsets.data[d], offsets.data[d + 1] - offsets.data[d], n_words + d));
  Py_END_ALLOW_THREADS;
  return Py_BuildValue("(NN)", reasons, words);
}

// -- unit table (ftlm.data.encode.FastEncoder) -------------------------------------------------------------------
// A text splits into units, each a run of space/tab/newline/CR and the word after it (encode._UNITS); the table
// numbers every distinct unit it has seen, in order of first sight. `units_lookup` gives every unit of a chunk its
// number and returns the units it had not seen (new numbers, in order), which Python encodes with the tokenizer.
class UnitTable {
 public:
  Py_ssize_t size() const { return static_cast<Py_ssize_t>(length_.size()); }
  void clear() {
    chars_.clear();
    start_.clear();
    length_.clear();
    hash_.clear();
    slots_.assign(1 << 12, -1);
  }
  // -> (number, whether it is new)
  std::pair<int64_t, bool> find_or_add(const u32* unit, Py_ssize_t n) {
    if (slots_.empty() || 2 * (length_.size() + 1) > slots_.size()) grow();
    const u64 h = hash_run(unit, n);
    size_t i = static_cast<size_t>(h) & (slots_.size() - 1);
    while (slots_[i] >= 0) {
      const int64_t k = slots_[i];
      if (hash_[k] == h && length_[k] == n && std::memcmp(&chars_[start_[k]], unit, n * sizeof(u32)) == 0)
        return {k, false};
      i = (i + 1) & (slots_.size() - 1);
    }
    const auto k = static_cast<int64_t>(length_.size());
    slots_[i] = k;
    start_.push_back(static_cast<int64_t>(chars_.size()));
    length_.push_back(n);
    hash_.push_back(h);
    chars_.insert(chars_.end(), unit, unit + n);
    return {k, true};
  }
  const u32* chars(int64_t k) const { return &chars_[start_[k]]; }
  Py_ssize_t length(int64_t k) const { return length_[k]; }

 private:
  void grow() {
    std::vector<int64_t> slots(std::max<size_t>(1 << 12, 2 * slots_.size()), -1);
    for (size_t k = 0; k < length_.size(); ++k) {
      size_t i = static_cast<size_t>(hash_[k]) & (slots.size() - 1);
      while (slots[i] >= 0) i = (i + 1) & (slots.size() - 1);
      slots[i] = static_cast<int64_t>(k);
    }
    slots_.swap(slots);
  }
  std::vector<u32> chars_;
  std::vector<int64_t> start_;
  std::vector<Py_ssize_t> length_;
  std::vector<u64> hash_;
  std::vector<int64_t> slots_;
};

constexpr const char* kUnitTable = "ftlm._text.UnitTable";

void free_units(PyObject* capsule) { delete static_cast<UnitTable*>(PyCapsule_GetPointer(capsule, kUnitTable)); }

UnitTable* units_of(PyObject* capsule) { return static_cast<UnitTable*>(PyCapsule_GetPointer(capsule, kUnitTable)); }

PyObject* units_new(PyObject*, PyObject*) {
  auto* table = new UnitTable();
  table->clear();
  PyObject* capsule = PyCapsule_New(table, kUnitTable, free_units);
  if (capsule == nullptr) delete table;
  return capsule;
}

PyObject* units_size(PyObject*, PyObject* args) {
  PyObject* capsule;
  if (!PyArg_ParseTuple(args, "O", &capsule)) return nullptr;
  UnitTable* table = units_of(capsule);
  return table == nullptr ? nullptr : PyLong_FromSsize_t(table->size());
}

PyObject* units_clear(PyObject*, PyObject* args) {
  PyObject* capsule;
  if (!PyArg_ParseTuple(args, "O", &capsule)) return nullptr;
  UnitTable* table = units_of(capsule);
  if (table == nullptr) return nullptr;
  table->clear();
  Py_RETURN_NONE;
}

PyObject* units_lookup(PyObject*, PyObject* args) {
  PyObject *capsule, *codes_obj, *offsets_obj;
  if (!PyArg_ParseTuple(args, "OOO", &capsule, &codes_obj, &offsets_obj)) return nullptr;
  UnitTable* table = units_of(capsule);
  if (table == nullptr) return nullptr;
  View<u32> codes(codes_obj, "codes");
  View<int64_t> offsets(offsets_obj, "offsets");
  if (!codes.ok || !offsets.ok) return nullptr;
  const Py_ssize_t n_texts = offsets.size - 1;
  bool bad = n_texts < 0;
  for (Py_ssize_t d = 0; !bad && d < n_texts; ++d)
    bad = offsets.data[d] < 0 || offsets.data[d] > offsets.data[d + 1] || offsets.data[d + 1] > codes.size;
  if (bad) {
    PyErr_SetString(PyExc_ValueError, "ftlm._text.units_lookup: offsets must rise from 0 within the codes");
    return nullptr;
  }
  std::vector<int64_t> numbers, counts(static_cast<size_t>(n_texts));
  std::vector<int64_t> fresh;  // numbers of the units first seen in this call
  // the GIL stays held: the table is shared state
  numbers.reserve(static_cast<size_t>(codes.size / 4 + 16));
  for (Py_ssize_t d = 0; d < n_texts; ++d) {
    const u32* text = codes.data + offsets.data[d];
    const Py_ssize_t n = offsets.data[d + 1] - offsets.data[d];
    const size_t before = numbers.size();
    Py_ssize_t i = 0;
    while (i < n) {
      const Py_ssize_t start = i;
      while (i < n && split_space(text[i])) ++i;
      while (i < n && !split_space(text[i])) ++i;
      const auto [k, is_new] = table->find_or_add(text + start, i - start);
      numbers.push_back(k);
      if (is_new) fresh.push_back(k);
    }
    counts[static_cast<size_t>(d)] = static_cast<int64_t>(numbers.size() - before);
  }
  PyObject* missing = PyList_New(static_cast<Py_ssize_t>(fresh.size()));
  if (missing == nullptr) return nullptr;
  for (size_t m = 0; m < fresh.size(); ++m) {
    PyObject* unit = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, table->chars(fresh[m]), table->length(fresh[m]));
    if (unit == nullptr) {
      Py_DECREF(missing);
      return nullptr;
    }
    PyList_SET_ITEM(missing, static_cast<Py_ssize_t>(m), unit);
  }
  return Py_BuildValue("(NNN)", as_bytes(numbers), as_bytes(counts), missing);
}

// -- byte-level BPE for new units --------------------------------------------------------------------------------
// What the tokenizers library does to one unit of a GPT-2-style tokenizer (ByteLevel pre-tokenizer with its regex,
// BPE without dropout, prefixes, suffixes or ignore_merges; encode._native_bpe checks that), without its per-call
// Python and allocation costs. The regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// on a unit (a run of space/tab/newline/CR, then a word without whitespace) gives: the run less its last character
// as one piece (if longer than one); the last character either as the prefix of the word's first piece (a space)
// or alone; then the word's pieces: a contraction, or a maximal run of letters, of numbers or of other characters.
// A unit that is all whitespace is one piece. BPE merges the lowest-ranked adjacent pair first (the leftmost of
// equal ones), as the library's priority queue does. Characters outside the classes table (code points whose class
// might differ between Python's Unicode tables and the library's) make the unit go back to the library.
enum CharClass : u8 { kOther = 0, kLetter = 1, kNumber = 2, kUnknown = 3 };

class Bpe {
 public:
  Bpe(const int32_t* byte_ids, const int32_t* merges, Py_ssize_t n_merges, const u8* classes, Py_ssize_t n_classes)
      : classes_(classes, classes + n_classes) {
    std::copy(byte_ids, byte_ids + 256, byte_id_.begin());
    size_t capacity = 16;
    while (capacity < 2 * static_cast<size_t>(n_merges)) capacity *= 2;
    slots_.assign(capacity, Merge{~0ULL, 0, 0});
    for (Py_ssize_t r = 0; r < n_merges; ++r) {
      const u64 key = pair_key(merges[3 * r], merges[3 * r + 1]);
      size_t i = static_cast<size_t>(mix(key)) & (capacity - 1);
      while (slots_[i].key != ~0ULL && slots_[i].key != key) i = (i + 1) & (capacity - 1);
      if (slots_[i].key == key) continue;  // a repeated merge keeps its first (lowest) rank, as the library does
      slots_[i] = Merge{key, static_cast<int32_t>(r), merges[3 * r + 2]};
    }
  }

  // Appends the ids of one unit; false (and nothing appended) if a character is outside the classes table.
  bool encode(const u32* u, Py_ssize_t n, std::vector<int64_t>* ids) {
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!split_space(u[i]) && cls(u[i]) == kUnknown) return false;
    Py_ssize_t k = 0;
    while (k < n && split_space(u[k])) ++k;
    if (k == n) {
      piece(u, 0, n, ids);
      return true;
    }
    if (k >= 2) piece(u, 0, k - 1, ids);
    Py_ssize_t i = k;
    if (k >= 1) {
      if (u[k - 1] == ' ') {
        i = run(u, k, n, cls(u[k]));
        piece(u, k - 1, i, ids);
      } else {
        piece(u, k - 1, k, ids);
      }
    }
    while (i < n) {
      const Py_ssize_t c = contraction(u, i, n);
      const Py_ssize_t end = c ? i + c : run(u, i, n, cls(u[i]));
      piece(u, i, end, ids);
      i = end;
    }
    return true;
  }

 private:
  struct Merge {
    u64 key;
    int32_t rank, merged;
  };
  static u64 pair_key(int32_t a, int32_t b) { return (static_cast<u64>(static_cast<u32>(a)) << 32) | static_cast<u32>(b); }
  u8 cls(u32 c) const { return c < classes_.size() ? classes_[c] : kUnknown; }
  Py_ssize_t run(const u32* u, Py_ssize_t i, Py_ssize_t n, u8 c) const {
    while (i < n && cls(u[i]) == c) ++i;
    return i;
  }
  static Py_ssize_t contraction(const u32* u, Py_ssize_t i, Py_ssize_t n) {
    if (u[i] != '\'' || i + 1 >= n) return 0;
    const u32 a = u[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 < n) {
      const u32 b = u[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    return 0;
  }
  const Merge* find(int32_t a, int32_t b) const {
    const u64 key = pair_key(a, b);
    size_t i = static_cast<size_t>(mix(key)) & (slots_.size() - 1);
    while (slots_[i].key != ~0ULL) {
      if (slots_[i].key == key) return &slots_[i];
      i = (i + 1) & (slots_.size() - 1);
    }
    return nullptr;
  }
  void piece(const u32* u, Py_ssize_t begin, Py_ssize_t end, std::vector<int64_t>* ids) {
    symbols_.clear();
    for (Py_ssize_t i = begin; i < end; ++i) {  // UTF-8 bytes, each its byte-level symbol
      const u32 c = u[i];
      if (c < 0x80) {
        symbols_.push_back(byte_id_[c]);
      } else if (c < 0x800) {
        symbols_.push_back(byte_id_[0xC0 | (c >> 6)]);
        symbols_.push_back(byte_id_[0x80 | (c & 0x3F)]);
      } else if (c < 0x10000) {
        symbols_.push_back(byte_id_[0xE0 | (c >> 12)]);
        symbols_.push_back(byte_id_[0x80 | ((c >> 6) & 0x3F)]);
        symbols_.push_back(byte_id_[0x80 | (c & 0x3F)]);
      } else {
        symbols_.push_back(byte_id_[0xF0 | (c >> 18)]);
        symbols_.push_back(byte_id_[0x80 | ((c >> 12) & 0x3F)]);
        symbols_.push_back(byte_id_[0x80 | ((c >> 6) & 0x3F)]);
        symbols_.push_back(byte_id_[0x80 | (c & 0x3F)]);
      }
    }
    while (symbols_.size() > 1) {  // pieces are short: a scan per merge beats a heap
      int32_t best_rank = INT32_MAX, merged = 0;
      size_t at = 0;
      for (size_t j = 0; j + 1 < symbols_.size(); ++j) {
        const Merge* m = find(symbols_[j], symbols_[j + 1]);
        if (m != nullptr && m->rank < best_rank) {
          best_rank = m->rank;
          merged = m->merged;
          at = j;
        }
      }
      if (best_rank == INT32_MAX) break;
      symbols_[at] = merged;
      symbols_.erase(symbols_.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    ids->insert(ids->end(), symbols_.begin(), symbols_.end());
  }

  std::array<int32_t, 256> byte_id_{};
  std::vector<u8> classes_;
  std::vector<Merge> slots_;
  std::vector<int32_t> symbols_;
};

constexpr const char* kBpe = "ftlm._text.Bpe";

void free_bpe(PyObject* capsule) { delete static_cast<Bpe*>(PyCapsule_GetPointer(capsule, kBpe)); }

PyObject* bpe_new(PyObject*, PyObject* args) {
  PyObject *bytes_obj, *merges_obj, *classes_obj;
  if (!PyArg_ParseTuple(args, "OOO", &bytes_obj, &merges_obj, &classes_obj)) return nullptr;
  View<int32_t> byte_ids(bytes_obj, "byte ids"), merges(merges_obj, "merges");
  View<u8> classes(classes_obj, "classes");
  if (!byte_ids.ok || !merges.ok || !classes.ok) return nullptr;
  if (byte_ids.size != 256 || merges.size % 3 != 0) {
    PyErr_SetString(PyExc_ValueError, "ftlm._text.bpe_new: needs 256 byte ids and (M, 3) merges");
    return nullptr;
  }
  auto* bpe = new Bpe(byte_ids.data, merges.data, merges.size / 3, classes.data, classes.size);
  PyObject* capsule = PyCapsule_New(bpe, kBpe, free_bpe);
  if (capsule == nullptr) delete bpe;
  return capsule;
}

PyObject* bpe_encode(PyObject*, PyObject* args) {
  PyObject *capsule, *units;
  if (!PyArg_ParseTuple(args, "OO!", &capsule, &PyList_Type, &units)) return nullptr;
  auto* bpe = static_cast<Bpe*>(PyCapsule_GetPointer(capsule, kBpe));
  if (bpe == nullptr) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(units);
  std::vector<int64_t> ids, lengths(static_cast<size_t>(n));
  std::vector<u32> buffer;
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* unit = PyList_GET_ITEM(units, k);
    if (!PyUnicode_Check(unit)) {
      PyErr_SetString(PyExc_TypeError, "ftlm._text.bpe_encode: units must be str");
      return nullptr;
    }
    const Py_ssize_t length = PyUnicode_GET_LENGTH(unit);
    buffer.resize(static_cast<size_t>(length) + 1);
    if (PyUnicode_AsUCS4(unit, reinterpret_cast<Py_UCS4*>(buffer.data()), length + 1, 1) == nullptr) return nullptr;
    const size_t before = ids.size();
    lengths[static_cast<size_t>(k)] =
        bpe->encode(buffer.data(), length, &ids) ? static_cast<int64_t>(ids.size() - before) : -1;
  }
  return Py_BuildValue("(NN)", as_bytes(ids), as_bytes(lengths));
}

PyMethodDef methods[] = {
    {"bpe_new", bpe_new, METH_VARARGS,
     "bpe_new(byte ids int32 (256,), merges int32 (M, 3) [left, right, merged] in rank order, character classes "
     "uint8 (N,): 0 other, 1 letter, 2 number, 3 unknown) -> a byte-level BPE"},
    {"bpe_encode", bpe_encode, METH_VARARGS,
     "bpe_encode(bpe, units list[str]) -> (ids int64 bytes, ids per unit int64 bytes, -1 where a unit holds a "
     "character of unknown class: the library must encode it)"},
    {"units_new", units_new, METH_NOARGS, "a new, empty unit table (ftlm.data.encode.FastEncoder owns one)"},
    {"units_size", units_size, METH_VARARGS, "units_size(table) -> number of distinct units it holds"},
    {"units_clear", units_clear, METH_VARARGS, "units_clear(table): forget every unit"},
    {"units_lookup", units_lookup, METH_VARARGS,
     "units_lookup(table, codes uint32 (C,), offsets int64 (D+1,)) -> (unit numbers int64 bytes (U,), units per "
     "text int64 bytes (D,), the units not seen before, as str, in the order of their new numbers)"},
    {"minhash", minhash, METH_VARARGS,
     "minhash(codes uint32 (C,) with NUL between documents, n_docs, ngram, a uint32 (P,), b uint32 (P,), "
     "word table uint8 (65536,), out uint32 (n_docs, P)): writes the signatures"},
    {"canonical", canonical, METH_VARARGS,
     "canonical(codes uint32 (C,) with NUL between documents, n_docs, space uint8 (65536,)) -> (UTF-8 bytes of "
     "every document's ' '.join(text.split()), offsets int64 (n_docs+1,) into them)"},
    {"quality", quality, METH_VARARGS,
     "quality(codes uint32 (C,), offsets int64 (D+1,), space uint8 (65536,), letter uint8 (N,), script uint8 "
     "(65536,) or None, 8 thresholds (NaN = off), top n-gram (n, limit) float64 pairs, repeated n-gram pairs) -> "
     "(reason codes bytes (D,), words int64 bytes (D,))"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_text", "ftlm's native text kernels for data preparation", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__text(void) { return PyModule_Create(&module); }
