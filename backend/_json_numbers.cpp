// The common REST predict body, `{"instances"|"inputs": <regular nested array of numbers>, "signature_name": "..."}`,
// read by simdjson in two steps (backend/numeric_json.py says why two):
//   scan(body) -> (key, signature_name, shape) | None
//       On the event loop, holding the GIL: checks the document's structure (its keys, a regular nested array with
//       numbers at its leaves) with simdjson's On-Demand API, which finds a number's type by its first character and
//       skips it without converting it. None declines the body (the general path reads it, and makes any error).
//   fill(body, out) -> bool
//       On a batch or inference thread, without the GIL: parses every number of the body's array, in order, into
//       `out` (a writable C-contiguous buffer of float64, float32 or int64). False when a number is malformed, does
//       not fit the buffer's type (an integer buffer refuses fractions and integers past int64), or the count differs.
// Numbers go through a double for float buffers, as TF Serving's own parser does (integers past 2**53 round).
// Each thread keeps its own parsers (a simdjson parser is reused across documents but never shared).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "simdjson.h"

using namespace simdjson;

namespace {

constexpr std::string_view kFormats[] = {"instances", "inputs"};
constexpr std::string_view kSignatureName = "signature_name";
constexpr size_t kMaxDepth = 64;  // deeper than any tensor a signature takes; deeper bodies go to the general path

// The nested array's shape as the walk finds it: every array at one depth must have the same length, and every
// number must sit at the same depth, below all the arrays.
struct ShapeWalk {
    std::vector<size_t> dims;
    size_t leaf_depth = SIZE_MAX;

    bool walk(ondemand::value& value, size_t depth) {
        ondemand::json_type type;
        if (value.type().get(type)) return false;
        if (type == ondemand::json_type::number) {
            if (leaf_depth == SIZE_MAX) {
                if (dims.size() != depth) return false;  // an array already sat at this depth
                leaf_depth = depth;
            }
            return depth == leaf_depth && depth > 0;  // skipped, not converted: fill() parses it
        }
        if (type != ondemand::json_type::array || depth >= kMaxDepth || depth >= leaf_depth) return false;
        if (dims.size() == depth) dims.push_back(0);  // the first array at this depth: its length is the shape's
        ondemand::array array;
        if (value.get_array().get(array)) return false;
        size_t count = 0;
        for (auto item : array) {
            ondemand::value child;
            if (std::move(item).get(child) || !walk(child, depth + 1)) return false;
            ++count;
        }
        if (dims[depth] == 0) dims[depth] = count;
        return count > 0 && dims[depth] == count;
    }
};

struct ScanResult {
    int format = -1;
    std::string signature_name;
    std::vector<size_t> shape;
};

bool scan_document(const char* data, size_t size, ScanResult& result) {
    static thread_local ondemand::parser parser;
    static thread_local std::string padded;  // On-Demand reads up to SIMDJSON_PADDING bytes past the end
    padded.assign(data, size);
    padded.resize(size + SIMDJSON_PADDING);
    ondemand::document document;
    if (parser.iterate(padded.data(), size, padded.size()).get(document)) return false;
    ondemand::object object;
    if (document.get_object().get(object)) return false;
    bool has_signature_name = false;
    for (auto item : object) {
        ondemand::field field;
        std::string_view key;
        if (std::move(item).get(field) || field.unescaped_key().get(key)) return false;
        if (key == kSignatureName) {
            std::string_view name;
            if (has_signature_name || field.value().get_string().get(name)) return false;
            has_signature_name = true;
            result.signature_name.assign(name);
            continue;
        }
        int format = key == kFormats[0] ? 0 : key == kFormats[1] ? 1 : -1;
        if (format < 0 || result.format >= 0) return false;  // another key, or both formats
        result.format = format;
        ShapeWalk shape;
        if (!shape.walk(field.value(), 0)) return false;  // a bare number too: the general path's business
        result.shape = std::move(shape.dims);
    }
    return result.format >= 0 && document.at_end();
}

// Writes the numbers of a parsed nested array in document order; false past the buffer's end or on a non-number.
template <typename T>
struct Flattener {
    T* out;
    size_t capacity;
    size_t written = 0;

    bool put(dom::element element) {
        if (element.is_array()) {
            dom::array array = element.get_array().value_unsafe();  // a copy: the result object is a temporary
            for (dom::element child : array) {
                if (!put(child)) return false;
            }
            return true;
        }
        if (written == capacity) return false;
        if constexpr (std::is_same_v<T, int64_t>) {
            if (!element.is_int64()) return false;
            out[written++] = element.get_int64().value_unsafe();
        } else {
            double value;
            if (element.get_double().get(value)) return false;
            out[written++] = static_cast<T>(value);
        }
        return true;
    }
};

template <typename T>
bool fill_numbers(const char* data, size_t size, void* out, size_t capacity) {
    static thread_local dom::parser parser;
    dom::element root;
    if (parser.parse(data, size, true).get(root) || !root.is_object()) return false;
    dom::object object = root.get_object().value_unsafe();
    for (std::string_view key : kFormats) {
        dom::element values;
        if (object.at_key(key).get(values) == SUCCESS) {
            Flattener<T> flattener{static_cast<T*>(out), capacity};
            return flattener.put(values) && flattener.written == capacity;
        }
    }
    return false;
}

PyObject* scan(PyObject*, PyObject* body) {
    char* data;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(body, &data, &size) < 0) return nullptr;
    ScanResult result;
    if (!scan_document(data, static_cast<size_t>(size), result)) Py_RETURN_NONE;
    PyObject* shape = PyTuple_New(static_cast<Py_ssize_t>(result.shape.size()));
    if (shape == nullptr) return nullptr;
    for (size_t i = 0; i < result.shape.size(); ++i) {
        PyObject* dim = PyLong_FromSize_t(result.shape[i]);
        if (dim == nullptr) {
            Py_DECREF(shape);
            return nullptr;
        }
        PyTuple_SET_ITEM(shape, static_cast<Py_ssize_t>(i), dim);
    }
    PyObject* name = PyUnicode_DecodeUTF8(result.signature_name.data(),
                                          static_cast<Py_ssize_t>(result.signature_name.size()), "strict");
    if (name == nullptr) {
        Py_DECREF(shape);
        return nullptr;
    }
    return Py_BuildValue("(sNN)", std::string(kFormats[result.format]).c_str(), name, shape);
}

PyObject* fill(PyObject*, PyObject* args) {
    PyObject* body;
    PyObject* out;
    if (!PyArg_ParseTuple(args, "O!O", &PyBytes_Type, &body, &out)) return nullptr;
    Py_buffer typed;
    if (PyObject_GetBuffer(out, &typed, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return nullptr;
    const char* format = typed.format ? typed.format : "B";
    if (*format == '<' || *format == '=' || *format == '@') ++format;
    const char* data = PyBytes_AS_STRING(body);
    size_t size = static_cast<size_t>(PyBytes_GET_SIZE(body));
    bool ok;
    if (std::strcmp(format, "d") == 0 && typed.itemsize == 8) {
        size_t capacity = static_cast<size_t>(typed.len) / 8;
        Py_BEGIN_ALLOW_THREADS
        ok = fill_numbers<double>(data, size, typed.buf, capacity);
        Py_END_ALLOW_THREADS
    } else if (std::strcmp(format, "f") == 0 && typed.itemsize == 4) {
        size_t capacity = static_cast<size_t>(typed.len) / 4;
        Py_BEGIN_ALLOW_THREADS
        ok = fill_numbers<float>(data, size, typed.buf, capacity);
        Py_END_ALLOW_THREADS
    } else if ((std::strcmp(format, "l") == 0 || std::strcmp(format, "q") == 0) && typed.itemsize == 8) {
        size_t capacity = static_cast<size_t>(typed.len) / 8;
        Py_BEGIN_ALLOW_THREADS
        ok = fill_numbers<int64_t>(data, size, typed.buf, capacity);
        Py_END_ALLOW_THREADS
    } else {
        PyBuffer_Release(&typed);
        PyErr_Format(PyExc_TypeError, "fill() takes a float64, float32 or int64 buffer, not format '%s'", format);
        return nullptr;
    }
    PyBuffer_Release(&typed);
    return PyBool_FromLong(ok);
}

PyMethodDef methods[] = {
    {"scan", scan, METH_O, "scan(body) -> (key, signature_name, shape) or None: the body's structure, numbers unread."},
    {"fill", fill, METH_VARARGS, "fill(body, out) -> bool: the body's numbers into out, without the GIL."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_json_numbers", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__json_numbers() { return PyModule_Create(&module); }
