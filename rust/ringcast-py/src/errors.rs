//! The Python exception tree (`ringcast.RingcastError` and its subclasses) and the one place
//! core errors become Python exceptions.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use ringcast_core as core;

struct Exceptions {
    base: Py<PyType>,
    segment: Py<PyType>,
    not_found: Py<PyType>,
    ended: Py<PyType>,
    offset_lost: Py<PyType>,
    invalid: Py<PyType>,
    full: Py<PyType>,
    quota: Py<PyType>,
}

static EXC: PyOnceLock<Exceptions> = PyOnceLock::new();

fn exceptions(py: Python<'_>) -> &Exceptions {
    EXC.get(py).expect("ringcast._core was not initialised")
}

/// Creates the exception classes and adds them to the module `m`. Classes with two bases
/// (`SessionNotFound` is also a `KeyError`) are made by calling `type` itself, which is why
/// this does not use `create_exception!` (one base only).
pub(crate) fn add_exceptions<'py>(py: Python<'py>, m: &Bound<'py, PyModule>) -> PyResult<()> {
    let type_ = py.get_type::<PyType>();
    let mk = |name: &str, bases: Bound<'_, PyTuple>, doc: &str| -> PyResult<Py<PyType>> {
        let d = PyDict::new(py);
        d.set_item("__module__", "ringcast")?;
        d.set_item("__doc__", doc)?;
        let t = type_.call1((name, bases, d))?.cast_into::<PyType>()?;
        m.add(name, &t)?;
        Ok(t.unbind())
    };
    let exc = py.get_type::<pyo3::exceptions::PyException>();
    let key = py.get_type::<pyo3::exceptions::PyKeyError>();
    let value = py.get_type::<pyo3::exceptions::PyValueError>();
    let base = mk(
        "RingcastError",
        PyTuple::new(py, [exc])?,
        "Base class of every error raised by ringcast.",
    )?;
    let b = base.bind(py).clone();
    let two = |o: &Bound<'py, PyType>| PyTuple::new(py, [b.clone(), o.clone()]);
    let one = || PyTuple::new(py, [b.clone()]);
    let e = Exceptions {
        segment: mk(
            "SegmentError",
            one()?,
            "The segment file is missing, not a ringcast segment, of another layout, or \
             corrupt (or a symbolic link: never followed); or the segment was closed; or, \
             from a write, its filesystem has no memory left for the stream's next bytes.",
        )?,
        not_found: mk(
            "SessionNotFound",
            two(&key)?,
            "No live session has this conversation id (for this owner).",
        )?,
        ended: mk(
            "SessionEnded",
            one()?,
            "The session a handle pointed at is gone: cancelled, replaced or evicted; or its \
             producer died.\n\n\
             ``reason`` is one of ``\"cancelled\"``, ``\"replaced\"``, ``\"evicted\"``, \
             ``\"producer_died\"`` (a reader waiting on a running session whose producer \
             process is gone).",
        )?,
        offset_lost: mk(
            "OffsetLost",
            one()?,
            "The requested offset was dropped from the front of the ring.\n\n\
             ``first_available`` is the lowest offset that can still be read; ``requested`` \
             the offset asked for.",
        )?,
        invalid: mk(
            "InvalidArgument",
            two(&value)?,
            "A bad argument: an over-long or empty conversation id, a zero size, and so on.",
        )?,
        full: mk(
            "RegistryFull",
            one()?,
            "Every session slot holds a running stream (finished sessions are evicted to make room).",
        )?,
        quota: mk(
            "QuotaExceeded",
            one()?,
            "A create with ``max_running`` found that many running sessions already in the \
             groups it counts.\n\n``max_running`` is the quota.",
        )?,
        base,
    };
    let _ = EXC.set(py, e);
    Ok(())
}

/// The one place core errors become Python exceptions.
pub(crate) fn to_py(py: Python<'_>, e: core::Error) -> PyErr {
    let x = exceptions(py);
    let msg = e.to_string();
    let build = |cls: &Py<PyType>, attrs: &[(&str, Bound<'_, PyAny>)]| -> PyErr {
        match cls.bind(py).call1((msg.clone(),)) {
            Ok(obj) => {
                for (k, v) in attrs {
                    if let Err(err) = obj.setattr(*k, v) {
                        return err;
                    }
                }
                PyErr::from_value(obj)
            }
            Err(err) => err,
        }
    };
    match e {
        core::Error::Segment(_) => build(&x.segment, &[]),
        core::Error::InvalidArgument(_) => build(&x.invalid, &[]),
        core::Error::NotFound { .. } => build(&x.not_found, &[]),
        core::Error::Ended(r) => build(
            &x.ended,
            &[("reason", r.as_str().into_pyobject(py).unwrap().into_any())],
        ),
        core::Error::OffsetLost {
            requested,
            first_available,
        } => build(
            &x.offset_lost,
            &[
                (
                    "first_available",
                    first_available.into_pyobject(py).unwrap().into_any(),
                ),
                ("requested", requested.into_pyobject(py).unwrap().into_any()),
            ],
        ),
        core::Error::RegistryFull { .. } => build(&x.full, &[]),
        core::Error::QuotaExceeded { max_running } => build(
            &x.quota,
            &[(
                "max_running",
                max_running.into_pyobject(py).unwrap().into_any(),
            )],
        ),
        core::Error::TooManyProcesses => build(&x.base, &[]),
    }
}

/// `SessionEnded("producer_died")`: the session is still running in the segment, but the
/// process producing it is gone.
pub(crate) fn producer_died(py: Python<'_>, pid: u32) -> PyErr {
    let msg = format!(
        "the producer of this session (pid {pid}) died without finalizing it; no more bytes \
         will come unless another process takes the session over (Segment.take_over_dead)"
    );
    let cls = exceptions(py).ended.bind(py);
    match cls.call1((msg,)) {
        Ok(obj) => match obj.setattr("reason", "producer_died") {
            Ok(()) => PyErr::from_value(obj),
            Err(err) => err,
        },
        Err(err) => err,
    }
}

/// The error of using a reader after `close()`.
pub(crate) fn reader_closed(py: Python<'_>) -> PyErr {
    PyErr::from_type(
        exceptions(py).base.bind(py).clone(),
        "the reader was closed",
    )
}

/// `result.py_err(py)?`: a core result as a Python one, through [`to_py`].
pub(crate) trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for core::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
