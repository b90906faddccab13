//! Checking a plugin's types against the host's, in the direction the versions call for, and
//! saying what differs in the contract's words.
//!
//! abi_stable's checker compares an *interface* layout with an *implementation* layout and
//! accepts an implementation whose prefix types (the root module, the trait objects' vtables)
//! have at least the interface's fields. Its own loader always passes the host's layout as the
//! interface, so it refuses a plugin built for an older minor version (issue
//! rodrimati1992/abi_stable_crates#118). comms checks the pair itself:
//!
//! - plugin as new as the host or newer: the plugin must extend the host's contract;
//! - plugin older: the host must extend the plugin's contract, which is what "a later minor
//!   only adds at the end" means, and the host's accessors for what the plugin lacks return
//!   `None` (its trait methods fall back to their default bodies).
//!
//! A mismatch is described from abi_stable's structured report ([`AbiInstabilityErrors`]), not
//! from its text: the path to the first mismatch is read from the checker's stack of fields and
//! functions, the innermost contract object on it (the root module `PluginModule`, or the vtable
//! of `Transport`, `Discovery` or `HostServices`) names the method, `#[sabi_trait]`'s `param_N`
//! become the parameters' real names (a table here, `PARAMETER_NAMES`, tested against the real
//! vtables), and the values are given as the plugin's and this host's whichever side abi_stable
//! called "expected":
//!
//! ```text
//! Transport::send(envelope): Envelope has 8 fields, this host expects 7
//! the return type of Transport::info: TransportInfo.max_message_size is `u32`, this host expects `u64`
//! ```

use super::load_error::LoadError;
use comms_core::{
    abi_stable::{
        abi_stability::abi_checking::{
            check_layout_compatibility, AbiInstability, AbiInstabilityError, AbiInstabilityErrors,
            ExpectedFound,
        },
        library::lib_header_from_path,
        std_types::UTypeId,
        type_layout::{TLData, TLField, TLFieldOrFunction, TLFunction, TypeLayout},
        StableAbi,
    },
    Compatibility, InterfaceVersion, PluginModuleRef, INTERFACE_VERSION,
};
use std::{collections::HashSet, path::Path};

/// The parameter names of the contract's trait methods, by trait and method.
///
/// `#[sabi_trait]` records a method's parameters as `_self, param_0, param_1, ...`, so the names
/// a message should use are kept here. A test checks this table against the real vtables, both
/// ways: every method of `Transport`, `Discovery`, `HostServices` and `HostSocket` is listed with its number of
/// parameters, and nothing else is. (The root module's functions keep their names.)
const PARAMETER_NAMES: &[(&str, &str, &[&str])] = &[
    ("Transport", "info", &[]),
    ("Transport", "send", &["address", "envelope"]),
    ("Transport", "send_batch", &["batch"]),
    ("Transport", "receive", &["max_batch"]),
    ("Transport", "settle", &["settlements"]),
    ("Transport", "subscribe", &["pattern"]),
    ("Transport", "unsubscribe", &["pattern"]),
    ("Transport", "stats", &[]),
    ("Transport", "close", &[]),
    ("Discovery", "announce", &["record"]),
    ("Discovery", "withdraw", &["node"]),
    ("Discovery", "peers", &[]),
    ("Discovery", "next_event", &[]),
    ("Discovery", "close", &[]),
    ("Discovery", "find_service", &["service"]),
    ("HostServices", "max_log_level", &[]),
    ("HostServices", "log_enabled", &["level", "target"]),
    ("HostServices", "worker_threads", &[]),
    ("HostServices", "log", &["record"]),
    ("HostServices", "spawn", &["task"]),
    ("HostServices", "adopt_socket", &["fd"]),
    ("HostSocket", "poll_read", &["cx", "buffer"]),
    ("HostSocket", "poll_write", &["cx", "bytes"]),
    ("HostSocket", "shutdown_write", &[]),
];

/// Most lines of [`LoadError::IncompatibleLayout`]'s `details`.
const MAX_DETAIL_LINES: usize = 100;

/// Why the layouts do not match: abi_stable's report, and which side it took for which.
#[derive(Debug)]
pub struct LayoutMismatch {
    report: AbiInstabilityErrors,
    /// abi_stable's "expected" side is the plugin's (the plugin is older than the host).
    plugin_expected: bool,
}

/// Checks the plugin's root-module layout against the host's.
pub fn check(
    host: &'static TypeLayout,
    plugin: &'static TypeLayout,
    compatibility: Compatibility,
) -> Result<(), LayoutMismatch> {
    let plugin_expected = compatibility == Compatibility::PluginOlder;
    let checked = if plugin_expected {
        check_layout_compatibility(plugin, host)
    } else {
        check_layout_compatibility(host, plugin)
    };
    checked.map_err(|report| LayoutMismatch { report, plugin_expected })
}

impl LayoutMismatch {
    pub(crate) fn into_load_error(
        self,
        path: &Path,
        expected: InterfaceVersion,
        found: InterfaceVersion,
    ) -> LoadError {
        LoadError::IncompatibleLayout {
            path: path.to_path_buf(),
            expected,
            found,
            mismatch: self.mismatch(),
            details: self.details(),
        }
    }

    /// The first mismatch in the contract's words, one line, e.g.
    /// `Transport::send(envelope): Envelope has 8 fields, this host expects 7`.
    pub fn mismatch(&self) -> String {
        match self.first_error() {
            Some(error) => self.reader().describe(error),
            None => "the layouts differ".to_string(),
        }
    }

    /// The long form of [`LayoutMismatch::mismatch`], for `--verbose`: the path from the root
    /// module to the mismatch, the mismatched type as the plugin and this host have it (its
    /// fields, the differing ones marked), and the other errors at the same place; at most
    /// about 100 lines.
    pub fn details(&self) -> String {
        let Some(error) = self.first_error() else { return self.mismatch() };
        let reader = self.reader();
        let mut lines = vec!["where, from the root module down:".to_string()];
        lines.extend(reader.path(error).into_iter().map(|step| format!("  {step}")));
        lines.extend(reader.neighbours(error));
        // Other errors at the same place, each said once (two errors can read the same).
        let mut others: Vec<String> = vec![reader.describe(error)];
        for other in reader.ranked(error).into_iter().skip(1).map(|e| reader.problem(error, e)) {
            if !others.contains(&other) {
                others.push(other);
            }
        }
        others.remove(0);
        if !others.is_empty() {
            lines.push(String::new());
            lines.push("also there:".to_string());
            lines.extend(others.into_iter().map(|other| format!("  {other}")));
        }
        let more = self.report.errors.iter().filter(|e| !e.errs.is_empty()).count() - 1;
        if more > 0 {
            lines.push(String::new());
            lines.push(format!("and {more} more mismatched place(s) that this first one may explain"));
        }
        if lines.len() > MAX_DETAIL_LINES {
            let cut = lines.len() - (MAX_DETAIL_LINES - 1);
            lines.truncate(MAX_DETAIL_LINES - 1);
            lines.push(format!("… ({cut} more lines)"));
        }
        lines.join("\n")
    }

    /// The first place with errors of its own, in the order the checker walked the types (the
    /// places above it only report that something below them failed).
    fn first_error(&self) -> Option<&AbiInstabilityError> {
        self.report.errors.iter().filter(|error| !error.errs.is_empty()).min_by_key(|error| error.index)
    }

    fn reader(&self) -> Reader {
        Reader { plugin_expected: self.plugin_expected, package: contract_package(self.report.interface) }
    }
}

/// The package of the contract's types (`comms-core`): the root module's, behind its `PrefixRef`.
fn contract_package(root: &'static TypeLayout) -> &'static str {
    match root.phantom_fields().get(0) {
        Some(module) if root.name() == "PrefixRef" => module.layout().package().as_str(),
        _ => root.package().as_str(),
    }
}

/// The name of the contract object a prefix type is: `Transport` for the vtable of the
/// `#[sabi_trait] Transport` (type `VTable` in module `..::Transport_trait`), `PluginModule` for
/// the root module.
fn object_name(layout: &'static TypeLayout) -> String {
    let path = layout.mod_path().to_string();
    let module = path.rsplit("::").next().unwrap_or_default();
    match module.strip_suffix("_trait") {
        Some(object) => object.to_string(),
        None => layout.name().to_string(),
    }
}

/// A type's name as the contract says it: `Transport` for `Transport_TO`, its vtable and its
/// interface marker; the name otherwise.
fn type_name(layout: &'static TypeLayout) -> String {
    if is_generated(layout) {
        object_name(layout)
    } else {
        layout.name().to_string()
    }
}

/// Whether `layout` is one of the types `#[sabi_trait]` generates for a trait (its trait object
/// `X_TO`, its vtable, its interface marker), all in the module `X_trait`.
fn is_generated(layout: &'static TypeLayout) -> bool {
    layout.mod_path().to_string().rsplit("::").next().is_some_and(|module| module.ends_with("_trait"))
}

/// Whether `layout` is a type of the contract's own: a struct whose fields a message may name.
fn is_contract_data(layout: &'static TypeLayout, package: &str) -> bool {
    layout.package().as_str() == package && !is_object(layout, package) && !is_generated(layout)
}

/// Whether `layout` is a contract object: a prefix type of the contract's package.
fn is_object(layout: &'static TypeLayout, package: &str) -> bool {
    matches!(layout.data(), TLData::PrefixType(_)) && layout.package().as_str() == package
}

/// What the items of a type are called.
fn item_kind(layout: &'static TypeLayout, package: &str) -> &'static str {
    match layout.data() {
        TLData::PrefixType(_) if is_object(layout, package) && object_name(layout) != layout.name() => {
            "methods"
        }
        TLData::Enum(_) => "variant fields",
        _ => "fields",
    }
}

/// The real name of a trait method's parameter as `#[sabi_trait]` recorded it (`param_1` of
/// `Transport::send` is `envelope`, `_self` is `self`).
fn parameter_name(object: &str, method: &str, recorded: &str) -> String {
    if recorded == "_self" {
        return "self".to_string();
    }
    let Some(n) = recorded.strip_prefix("param_").and_then(|n| n.parse::<usize>().ok()) else {
        return recorded.to_string();
    };
    PARAMETER_NAMES
        .iter()
        .find(|(o, m, _)| *o == object && *m == method)
        .and_then(|(_, _, names)| names.get(n))
        .map_or_else(|| format!("parameter {}", n + 1), |name| name.to_string())
}

/// The parameter names a function pointer recorded, by position (`param_<i>` where it has none).
///
/// abi_stable 0.11's derive writes them separated by `,` while its reader splits them at `;`:
/// the checker reports the first parameter under all the names joined and the others as
/// `param_<i>` ([`checker_names`]), whatever they are called.
fn recorded_names(function: &TLFunction) -> Vec<String> {
    let mut names = function.param_names.as_str().split([',', ';']).map(str::trim);
    (0..function.param_type_layouts.len())
        .map(|i| {
            names.next().filter(|name| !name.is_empty()).map_or_else(|| format!("param_{i}"), str::to_string)
        })
        .collect()
}

/// The names abi_stable's checker gives a function's parameters (its `GetParamNames`).
fn checker_names(function: &TLFunction) -> Vec<String> {
    let mut names = function.param_names.as_str().split(';');
    (0..function.param_type_layouts.len())
        .map(|i| {
            names.next().filter(|name| !name.is_empty()).map_or_else(|| format!("param_{i}"), str::to_string)
        })
        .collect()
}

/// How a message names the parameter the checker calls `checker_name` of `function`, a method of
/// `object` (`None` for a plain function pointer): `envelope`, `setup`, or `returns`.
fn parameter_label(function: &TLFunction, checker_name: &str, object: Option<&str>, method: &str) -> String {
    if checker_name == "__returns" {
        return "returns".to_string();
    }
    let recorded = checker_names(function)
        .iter()
        .position(|name| name == checker_name)
        .and_then(|i| recorded_names(function).into_iter().nth(i))
        .unwrap_or_else(|| checker_name.to_string());
    match object {
        Some(object) => parameter_name(object, method, &recorded),
        None => recorded,
    }
}

/// A field as a line: `name: Type`, or `name: fn(a: A, b: B) -> R` for a function pointer
/// (a method of `object`, if given).
fn field_line(field: &TLField, object: Option<&str>) -> String {
    match field.function_range().iter().next() {
        Some(function) if field.is_function() => {
            format!("{}: {}", field.name(), signature(&function, object, field.name()))
        }
        _ => format!("{}: {}", field.name(), display_type(field.layout())),
    }
}

/// A type as messages show it: contract objects by their name (`Transport`), others in full.
///
/// abi_stable's `RVec`, `ROption` and `RResult` record no type parameters; they are read back
/// from their fields (`RVec<Header>`, `RResult<TransportInfo, CommsError>`).
fn display_type(layout: &'static TypeLayout) -> String {
    let name = type_name(layout);
    if name != layout.name() {
        return name;
    }
    if let Some(output) = future_output(layout) {
        return format!("FfiFuture<{}>", display_type(output));
    }
    let full = layout.full_type().to_string();
    if layout.package().as_str() != "abi_stable" || full.contains('<') {
        return full;
    }
    let fields = fields_of(layout);
    let parameters: Vec<String> = match layout.name() {
        // `buffer: NonNull<T>`.
        "RVec" => fields
            .first()
            .and_then(|buffer| {
                let pointer = buffer.layout().full_type().to_string();
                pointer.strip_prefix("NonNull<").and_then(|rest| rest.strip_suffix('>')).map(str::to_string)
            })
            .into_iter()
            .collect(),
        // The payloads of `RSome(T)`, `ROk(T)` and `RErr(E)`.
        "ROption" | "RResult" => fields.iter().map(|field| display_type(field.layout())).collect(),
        _ => Vec::new(),
    };
    if parameters.is_empty() {
        full
    } else {
        format!("{full}<{}>", parameters.join(", "))
    }
}

/// What an async-ffi future resolves to: the payload of the `FfiPoll` its `poll_fn` returns.
fn future_output(layout: &'static TypeLayout) -> Option<&'static TypeLayout> {
    if layout.package().as_str() != "async-ffi" {
        return None;
    }
    let fields = fields_of(layout);
    match layout.name() {
        "BorrowingFfiFuture" | "FfiFuture" => fields.first().and_then(|inner| future_output(inner.layout())),
        "LocalBorrowingFfiFuture" | "LocalFfiFuture" => {
            let poll = fields.iter().find(|field| field.name() == "poll_fn")?;
            let returns = poll.function_range().iter().next()?.return_type_layout()?;
            fields_of(returns()).first().map(|ready| ready.layout())
        }
        _ => None,
    }
}

/// `fn(address: RString, envelope: Envelope) -> u32`; for a method of `object` the receiver is
/// left out and the parameters get their real names.
fn signature(function: &TLFunction, object: Option<&str>, method: &str) -> String {
    let params: Vec<String> = recorded_names(function)
        .into_iter()
        .zip(function.param_type_layouts.iter())
        .filter(|(name, _)| object.is_none() || name != "_self")
        .map(|(name, layout)| {
            let name = match object {
                Some(object) => parameter_name(object, method, &name),
                None => name,
            };
            format!("{name}: {}", display_type(layout()))
        })
        .collect();
    match function.return_type_layout() {
        Some(returns) => format!("fn({}) -> {}", params.join(", "), display_type(returns())),
        None => format!("fn({})", params.join(", ")),
    }
}

/// The fields of a type, if it has any.
fn fields_of(layout: &'static TypeLayout) -> Vec<TLField> {
    match layout.data() {
        TLData::Struct { fields } | TLData::Union { fields } => fields.to_vec(),
        TLData::PrefixType(prefix) => prefix.fields.to_vec(),
        TLData::Enum(enumeration) => enumeration.fields.to_vec(),
        TLData::Primitive(_) | TLData::Opaque => Vec::new(),
    }
}

/// One step of the checker's path, as the plugin has it.
#[derive(Clone, Copy)]
enum Step {
    Field(TLField),
    Function(TLFunction),
}

/// Where on the path the mismatch is, relative to the innermost contract object.
struct Place {
    /// `Transport::send(envelope)`, `the return type of Transport::info`, `Transport::send`,
    /// `PluginModule::attach_host(host)`; empty when the path has no contract object.
    entry: String,
    /// Fields of contract types between the entry and the mismatch: `Envelope.headers`.
    chain: Vec<String>,
    /// The last part (`entry`, or the last of `chain`) names the last step of the path, so a
    /// mismatch of the field's type reads `<part> is X`.
    names_last_step: bool,
    /// The method, when the path goes through one.
    method: Option<Method>,
}

/// A method of a contract object (a trait method, or a function of the root module).
struct Method {
    object: String,
    name: String,
    /// A `#[sabi_trait]` method: a receiver first, parameters recorded as `param_N`.
    is_trait: bool,
    function: Option<TLFunction>,
}

impl Method {
    /// How a message names the parameter the checker calls `checker_name`.
    fn parameter(&self, checker_name: &str) -> String {
        let object = self.is_trait.then_some(self.object.as_str());
        match &self.function {
            Some(function) => parameter_label(function, checker_name, object, &self.name),
            None => checker_name.to_string(),
        }
    }
}

/// Reads abi_stable's report with the sides sorted out.
struct Reader {
    plugin_expected: bool,
    /// The contract's package.
    package: &'static str,
}

impl Reader {
    /// (plugin's, host's) of an expected/found pair.
    fn sides<'a, T>(&self, pair: &'a ExpectedFound<T>) -> (&'a T, &'a T) {
        if self.plugin_expected {
            (&pair.expected, &pair.found)
        } else {
            (&pair.found, &pair.expected)
        }
    }

    fn steps(&self, error: &AbiInstabilityError) -> Vec<Step> {
        error
            .stack_trace
            .iter()
            .map(|pair| match self.sides(pair).0 {
                TLFieldOrFunction::Field(field) => Step::Field(*field),
                TLFieldOrFunction::Function(function) => Step::Function(*function),
            })
            .collect()
    }

    /// The host's side of step `index` of the path, if it is a field.
    fn host_field(&self, error: &AbiInstabilityError, index: usize) -> Option<TLField> {
        match error.stack_trace.get(index).map(|pair| self.sides(pair).1) {
            Some(TLFieldOrFunction::Field(field)) => Some(*field),
            _ => None,
        }
    }

    fn place(&self, steps: &[Step]) -> Place {
        let nowhere = |chain| Place { entry: String::new(), chain, names_last_step: false, method: None };
        let anchor = steps.iter().rposition(|step| match step {
            Step::Field(field) => is_object(field.layout(), self.package),
            Step::Function(_) => false,
        });
        let Some(anchor) = anchor else { return nowhere(self.chain(steps, 0)) };
        let Step::Field(object_field) = steps[anchor] else { unreachable!("the anchor is a field") };
        let Some(Step::Field(method_field)) = steps.get(anchor + 1) else { return nowhere(Vec::new()) };
        let object = object_name(object_field.layout());
        let method = Method {
            is_trait: object != object_field.layout().name(),
            object,
            name: method_field.name().to_string(),
            // anchor + 2 is the function, anchor + 3 one of its parameters or its return type.
            function: match steps.get(anchor + 2) {
                Some(Step::Function(function)) => Some(*function),
                _ => None,
            },
        };
        let qualified = format!("{}::{}", method.object, method.name);
        let Some(Step::Field(parameter)) = steps.get(anchor + 3) else {
            let names_last_step = steps.len() <= anchor + 2;
            return Place { entry: qualified, chain: Vec::new(), names_last_step, method: Some(method) };
        };
        let entry = if parameter.name() == "__returns" {
            format!("the return type of {qualified}")
        } else {
            format!("{qualified}({})", method.parameter(parameter.name()))
        };
        let chain = self.chain(steps, anchor + 4);
        let names_last_step = if chain.is_empty() {
            steps.len() == anchor + 4
        } else {
            self.chain_ends_at_last_step(steps, anchor + 4)
        };
        Place { entry, chain, names_last_step, method: Some(method) }
    }

    /// `Type.field` for each step from `from` whose parent is a contract type.
    fn chain(&self, steps: &[Step], from: usize) -> Vec<String> {
        let mut chain = Vec::new();
        for i in from.max(1)..steps.len() {
            let (Step::Field(parent), Step::Field(field)) = (steps[i - 1], steps[i]) else { continue };
            let parent = parent.layout();
            if is_contract_data(parent, self.package) {
                let name = field.name();
                let name = name.strip_prefix("field_").unwrap_or(name);
                chain.push(format!("{}.{name}", type_name(parent)));
            }
        }
        chain
    }

    fn chain_ends_at_last_step(&self, steps: &[Step], from: usize) -> bool {
        match steps.len().checked_sub(2).map(|i| (i, &steps[i])) {
            Some((i, Step::Field(parent))) if i + 1 >= from.max(1) => {
                is_contract_data(parent.layout(), self.package)
            }
            _ => false,
        }
    }

    /// The errors of one place, most telling first.
    fn ranked<'e>(&self, error: &'e AbiInstabilityError) -> Vec<&'e AbiInstability> {
        // In a function, a different number of parameters comes first: it also makes the first
        // parameter's name differ (see `recorded_names`).
        let in_function = matches!(
            error.stack_trace.last().map(|pair| self.sides(pair).0),
            Some(TLFieldOrFunction::Function(_))
        );
        let rank = |error: &AbiInstability| -> u8 {
            match error {
                AbiInstability::FieldCountMismatch(_) if in_function => 0,
                AbiInstability::Name(_) => 0,
                AbiInstability::Package(_) | AbiInstability::PackageVersion(_) => 1,
                AbiInstability::UnexpectedField(_) => 2,
                AbiInstability::FieldCountMismatch(_) => 3,
                AbiInstability::MismatchedPrefixSize(_) => 4,
                AbiInstability::TLDataDiscriminant(_) | AbiInstability::MismatchedPrimitive(_) => 5,
                AbiInstability::Size(_) => 8,
                AbiInstability::Alignment(_) => 9,
                _ => 6,
            }
        };
        let mut errors: Vec<&AbiInstability> = error.errs.iter().collect();
        errors.sort_by_key(|error| rank(error));
        errors
    }

    /// The first mismatch of `error`'s place, in one line.
    fn describe(&self, error: &AbiInstabilityError) -> String {
        match self.ranked(error).first() {
            Some(first) => self.problem(error, first),
            None => "the layouts differ".to_string(),
        }
    }

    /// One error of `place`'s errors, as a sentence about that place.
    fn problem(&self, error: &AbiInstabilityError, problem: &AbiInstability) -> String {
        let steps = self.steps(error);
        let place = self.place(&steps);
        let mut parts: Vec<String> = Vec::new();
        if !place.entry.is_empty() {
            parts.push(place.entry.clone());
        }
        parts.extend(place.chain.iter().cloned());
        let at = parts.join(": ");
        // The type whose contents differ: the last step's, or the function at the end of the path.
        let last_type = match steps.last() {
            Some(Step::Field(field)) => Some(field.layout()),
            _ => None,
        };
        let subject = match last_type {
            Some(layout) => type_name(layout),
            None => place.entry.clone(),
        };
        let kind = last_type.map_or("fields", |layout| item_kind(layout, self.package));
        let about_type = |text: String| if at.is_empty() { text } else { format!("{at}: {text}") };
        let about_field = |plugin: String, host: String| {
            if place.names_last_step && !at.is_empty() {
                format!("{at} is `{plugin}`, this host expects `{host}`")
            } else {
                about_type(format!("`{plugin}` where this host expects `{host}`"))
            }
        };
        let in_function = matches!(steps.last(), Some(Step::Function(_)));
        let functions = match error.stack_trace.last().map(|pair| self.sides(pair)) {
            Some((TLFieldOrFunction::Function(plugin), TLFieldOrFunction::Function(host))) => {
                Some((*plugin, *host))
            }
            _ => None,
        };
        // abi_stable's own entries of a vtable are not counted as methods.
        let hidden = match (last_type, steps.len().checked_sub(1).and_then(|i| self.host_field(error, i))) {
            (Some(plugin), Some(host)) => (hidden_fields(plugin), hidden_fields(host.layout())),
            _ => (0, 0),
        };
        match problem {
            AbiInstability::Name(pair) => {
                let (plugin, host) = self.sides(pair);
                about_field(plugin.to_string(), host.to_string())
            }
            AbiInstability::MismatchedPrimitive(pair) => {
                let (plugin, host) = self.sides(pair);
                about_field(format!("{plugin:?}"), format!("{host:?}"))
            }
            AbiInstability::FieldCountMismatch(_) | AbiInstability::UnexpectedField(_)
                if functions.is_some_and(|(plugin, host)| {
                    plugin.param_type_layouts.len() != host.param_type_layouts.len()
                }) =>
            {
                // A parameter more or less. (abi_stable does not always report the count: then a
                // name differs, the first one, which it reads wrongly; see `recorded_names`.)
                let (plugin, host) = functions.expect("checked just above");
                let receiver = usize::from(place.method.as_ref().is_some_and(|method| method.is_trait));
                let count = |function: TLFunction| function.param_type_layouts.len().saturating_sub(receiver);
                format!("{subject} takes {} parameter(s), this host expects {}", count(plugin), count(host))
            }
            AbiInstability::FieldCountMismatch(pair) => {
                let (plugin, host) = self.sides(pair);
                let (plugin, host) = (plugin.saturating_sub(hidden.0), host.saturating_sub(hidden.1));
                about_type(format!("{subject} has {plugin} {kind}, this host expects {host}"))
            }
            AbiInstability::UnexpectedField(pair) if in_function => {
                // Parameter names, each side by its own function.
                let (plugin, host) = self.sides(pair);
                let name = |function: Option<TLFunction>, field: &TLField| match (&place.method, function) {
                    (Some(method), Some(function)) => {
                        let object = method.is_trait.then_some(method.object.as_str());
                        parameter_label(&function, field.name(), object, &method.name)
                    }
                    _ => field.name().to_string(),
                };
                format!(
                    "{subject} has parameter `{}` where this host expects `{}`",
                    name(functions.map(|(plugin, _)| plugin), plugin),
                    name(functions.map(|(_, host)| host), host)
                )
            }
            AbiInstability::UnexpectedField(pair) => {
                let (plugin, host) = self.sides(pair);
                let what = kind.trim_end_matches('s');
                about_type(format!(
                    "{subject} has {what} `{}` where this host expects `{}`",
                    plugin.name(),
                    host.name()
                ))
            }
            AbiInstability::Package(pair) => {
                let (plugin, host) = self.sides(pair);
                about_type(format!("{subject} comes from package `{plugin}`, this host expects `{host}`"))
            }
            AbiInstability::PackageVersion(pair) => {
                let (plugin, host) = self.sides(pair);
                let package = last_type.map_or("its package", |layout| layout.package().as_str());
                about_type(format!(
                    "{subject} comes from {package} {}, this host expects {}",
                    plugin.version, host.version
                ))
            }
            AbiInstability::MismatchedPrefixSize(pair) => {
                let (plugin, host) = self.sides(pair);
                let (plugin, host) = (
                    usize::from(*plugin).saturating_sub(hidden.0),
                    usize::from(*host).saturating_sub(hidden.1),
                );
                about_type(format!(
                    "{subject} has {plugin} {kind} that every version must have (up to the one marked \
                     last_prefix_field), this host expects {host}"
                ))
            }
            AbiInstability::TLDataDiscriminant(pair) => {
                let (plugin, host) = self.sides(pair);
                about_type(format!("{subject} is a {plugin:?}, this host expects a {host:?}"))
            }
            AbiInstability::Size(pair) => {
                let (plugin, host) = self.sides(pair);
                about_type(format!("{subject} is {plugin} bytes, this host expects {host}"))
            }
            AbiInstability::Alignment(pair) => {
                let (plugin, host) = self.sides(pair);
                about_type(format!("{subject} is aligned to {plugin} bytes, this host expects {host}"))
            }
            AbiInstability::TooManyVariants(pair) => {
                let (plugin, host) = self.sides(pair);
                about_type(format!("{subject} has {plugin} variants, this host expects {host}"))
            }
            AbiInstability::UnexpectedVariant(pair) => {
                let (plugin, host) = self.sides(pair);
                about_type(format!("{subject} has variant `{plugin}` where this host expects `{host}`"))
            }
            AbiInstability::ReprAttr(pair) => {
                let (plugin, host) = self.sides(pair);
                about_type(format!("{subject} is {plugin:?}, this host expects {host:?}"))
            }
            AbiInstability::NonZeroness(_) => {
                about_type(format!("{subject} differs in whether it may be null"))
            }
            AbiInstability::FieldLifetimeMismatch(_) | AbiInstability::FnLifetimeMismatch(_) => {
                about_type(format!("{subject} uses different lifetimes"))
            }
            AbiInstability::FnQualifierMismatch(_) => {
                about_type(format!("{subject} differs in its qualifiers (`unsafe`)"))
            }
            AbiInstability::GenericParamCount(_) | AbiInstability::MismatchedConstParam(_) => {
                about_type(format!("{subject} has different generic parameters"))
            }
            other => about_type(format!("{subject} differs: {}", short_debug(other))),
        }
    }

    /// The path to the mismatch in the contract's words: each method parameter or return value
    /// and each field of a contract type it goes through, e.g.
    /// `PluginModule::new_transport returns Transport`, `Transport::send(envelope): Envelope`.
    /// abi_stable's own fields and wrappers in between are left out; a path with nothing of the
    /// contract on it is given as it is.
    fn path(&self, error: &AbiInstabilityError) -> Vec<String> {
        let steps = self.steps(error);
        let mut lines = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let Step::Field(field) = step else { continue };
            let layout = field.layout();
            let before = |back: usize| i.checked_sub(back).map(|j| steps[j]);
            if let (Some(Step::Function(function)), Some(Step::Field(method)), Some(Step::Field(owner))) =
                (before(1), before(2), before(3))
            {
                if is_object(owner.layout(), self.package) {
                    let object = object_name(owner.layout());
                    let method = Method {
                        is_trait: object != owner.layout().name(),
                        object,
                        name: method.name().to_string(),
                        function: Some(function),
                    };
                    let qualified = format!("{}::{}", method.object, method.name);
                    lines.push(if field.name() == "__returns" {
                        format!("{qualified} returns {}", display_type(layout))
                    } else {
                        format!("{qualified}({}): {}", method.parameter(field.name()), display_type(layout))
                    });
                    continue;
                }
            }
            if let Some(Step::Field(parent)) = before(1) {
                let parent = parent.layout();
                if is_contract_data(parent, self.package) {
                    let name = field.name();
                    let name = name.strip_prefix("field_").unwrap_or(name);
                    lines.push(format!("{}.{name}: {}", type_name(parent), display_type(layout)));
                }
            }
        }
        if lines.is_empty() {
            lines = steps
                .iter()
                .filter_map(|step| match step {
                    Step::Field(field) => Some(format!("{}: {}", field.name(), display_type(field.layout()))),
                    Step::Function(_) => None,
                })
                .collect();
        }
        lines
    }

    /// The mismatched type (or function) as the plugin and this host have it: the type at the
    /// end of the path, or, when the mismatch is the type of a field, the contract type that
    /// holds the field, or the function whose parameter it is.
    fn neighbours(&self, error: &AbiInstabilityError) -> Vec<String> {
        let steps = self.steps(error);
        let Some(last) = steps.len().checked_sub(1) else { return Vec::new() };
        let about_field = matches!(
            self.ranked(error).first(),
            Some(
                AbiInstability::Name(_)
                    | AbiInstability::MismatchedPrimitive(_)
                    | AbiInstability::FieldLifetimeMismatch(_)
            )
        );
        match steps[last] {
            Step::Function(_) => return self.signatures(error, &steps, last),
            Step::Field(_) if about_field && last > 0 && matches!(steps[last - 1], Step::Function(_)) => {
                return self.signatures(error, &steps, last - 1)
            }
            Step::Field(_) => {}
        }
        let has_fields =
            |step: &Step| matches!(step, Step::Field(field) if !fields_of(field.layout()).is_empty());
        let shown = if !about_field && has_fields(&steps[last]) {
            Some(last)
        } else {
            (0..last).rev().find(|&i| {
                has_fields(&steps[i])
                    && matches!(steps[i], Step::Field(field) if field.layout().package().as_str() == self.package)
            })
        };
        let (Some(Step::Field(plugin)), Some(host)) =
            (shown.map(|i| steps[i]), shown.and_then(|i| self.host_field(error, i)))
        else {
            return Vec::new();
        };
        let (plugin, host) = (plugin.layout(), host.layout());
        let object = (is_object(plugin, self.package) && is_generated(plugin)).then(|| object_name(plugin));
        let (plugin_fields, host_fields) = (visible_fields(plugin), visible_fields(host));
        let kind = item_kind(plugin, self.package);
        let list = |fields: &[TLField], others: &[TLField]| -> Vec<String> {
            fields
                .iter()
                .enumerate()
                .map(|(i, field)| {
                    let line = field_line(field, object.as_deref());
                    let same =
                        others.get(i).is_some_and(|other| field_line(other, object.as_deref()) == line);
                    format!("  {line}{}", if same { "" } else { "    <- differs" })
                })
                .collect()
        };
        let mut lines = vec![String::new()];
        lines.push(format!("{} in the plugin ({} {kind}):", type_name(plugin), plugin_fields.len()));
        lines.extend(list(&plugin_fields, &host_fields));
        lines.push(format!("{} in this host ({} {kind}):", type_name(host), host_fields.len()));
        lines.extend(list(&host_fields, &plugin_fields));
        lines
    }

    /// The signatures of the function at step `index` of the path, the plugin's and this host's.
    fn signatures(&self, error: &AbiInstabilityError, steps: &[Step], index: usize) -> Vec<String> {
        let Step::Function(plugin) = steps[index] else { return Vec::new() };
        let place = self.place(&steps[..=index]);
        let method = place.method.as_ref();
        let object = method.filter(|method| method.is_trait).map(|method| method.object.as_str());
        let name = method.map_or("", |method| method.name.as_str());
        let mut lines = vec![String::new(), format!("in the plugin: {}", signature(&plugin, object, name))];
        if let Some(TLFieldOrFunction::Function(host)) =
            error.stack_trace.get(index).map(|pair| self.sides(pair).1)
        {
            lines.push(format!("in this host:  {}", signature(host, object, name)));
        }
        lines
    }
}

/// The fields of a type a message shows: a trait object's vtable without abi_stable's own
/// entries (`_sabi_tys`, `_sabi_vtable`).
fn visible_fields(layout: &'static TypeLayout) -> Vec<TLField> {
    let mut fields = fields_of(layout);
    if is_generated(layout) {
        fields.retain(|field| !field.name().starts_with("_sabi"));
    }
    fields
}

/// How many of a type's fields [`visible_fields`] leaves out.
fn hidden_fields(layout: &'static TypeLayout) -> usize {
    fields_of(layout).len() - visible_fields(layout).len()
}

/// An error abi_stable reports that the contract never produces, briefly.
fn short_debug(error: &AbiInstability) -> String {
    let text = format!("{error:?}");
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() > 120 {
        format!("{}…", text.chars().take(119).collect::<String>())
    } else {
        text
    }
}

/// What a plugin built for a newer minor has that the host does not know: the fields of the
/// root module and the methods of the contract's trait objects beyond the host's, e.g.
/// `PluginModule::config_help`, `Transport::flush`, in the order they are met walking the
/// contract from the root module.
///
/// A `HostServices::...` entry goes the other way: a method the plugin's contract has and this
/// host does not provide (the plugin runs its default body instead).
///
/// `host` and `plugin` are the two root-module layouts, already checked compatible.
pub fn additions(host: &'static TypeLayout, plugin: &'static TypeLayout) -> Vec<String> {
    let mut walk = Additions { package: contract_package(host), seen: HashSet::new(), found: Vec::new() };
    walk.types(host, plugin);
    walk.found
}

/// The additions of the plugin library at `path` over this host's contract (see
/// [`additions`]); empty for a library built for this host's contract version or an older
/// one, or one that is not a loadable plugin (loading it says why).
pub fn additions_in_library(path: &Path) -> Vec<String> {
    let Ok(header) = lib_header_from_path(path) else { return Vec::new() };
    let newer = InterfaceVersion::parse(header.version_strings().version.as_str())
        .is_some_and(|found| INTERFACE_VERSION.compatibility(found) == Compatibility::PluginNewer);
    match header.layout() {
        Some(plugin) if newer => additions(<PluginModuleRef as StableAbi>::LAYOUT, plugin),
        _ => Vec::new(),
    }
}

/// The walk behind [`additions`].
struct Additions {
    package: &'static str,
    /// Pairs of types already walked: the contract refers to itself (through its vtables).
    seen: HashSet<(UTypeId, UTypeId)>,
    found: Vec<String>,
}

impl Additions {
    fn types(&mut self, host: &'static TypeLayout, plugin: &'static TypeLayout) {
        if host.name() != plugin.name() || !self.seen.insert((host.get_utypeid(), plugin.get_utypeid())) {
            return;
        }
        for (host_field, plugin_field) in host.phantom_fields().iter().zip(plugin.phantom_fields().iter()) {
            self.fields(&host_field, &plugin_field);
        }
        if let (TLData::PrefixType(host_prefix), TLData::PrefixType(plugin_prefix)) =
            (host.data(), plugin.data())
        {
            if plugin.package().as_str() == self.package {
                let object = object_name(plugin);
                let added = plugin_prefix.fields.iter().skip(host_prefix.fields.len());
                self.found.extend(added.map(|field| format!("{object}::{}", field.name())));
            }
        }
        for (host_field, plugin_field) in fields_of(host).iter().zip(fields_of(plugin).iter()) {
            self.fields(host_field, plugin_field);
        }
    }

    fn fields(&mut self, host: &TLField, plugin: &TLField) {
        if host.name() != plugin.name() {
            return;
        }
        for (host_fn, plugin_fn) in host.function_range().iter().zip(plugin.function_range().iter()) {
            for (host_param, plugin_param) in
                host_fn.param_type_layouts.iter().zip(plugin_fn.param_type_layouts.iter())
            {
                self.types(host_param(), plugin_param());
            }
            if let (Some(host_returns), Some(plugin_returns)) =
                (host_fn.return_type_layout(), plugin_fn.return_type_layout())
            {
                self.types(host_returns(), plugin_returns());
            }
        }
        self.types(host.layout(), plugin.layout());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A miniature of the contract, in as many variants as the tests need: the same type names
    /// (`PluginModule`, `Transport`, `Envelope`, ...) in modules of their own, each variant with
    /// its additions or mistakes.
    macro_rules! contract {
        (
            $variant:ident,
            header { $($header_extra:tt)* },
            envelope { $($envelope_extra:tt)* },
            max_message_size: $max_message_size:ty,
            send($($send:tt)*),
            transport { $($transport_extra:tt)* },
            module { $($module_extra:tt)* }
        ) => {
            #[allow(dead_code, missing_debug_implementations, unreachable_pub)]
            mod $variant {
                use abi_stable::{
                    sabi_trait,
                    std_types::{RBox, RString, RVec},
                    StableAbi,
                };

                #[repr(C)]
                #[derive(StableAbi)]
                pub struct Header {
                    pub name: RString,
                    pub value: RString,
                    $($header_extra)*
                }

                #[repr(C)]
                #[derive(StableAbi)]
                pub struct Envelope {
                    pub id: u64,
                    pub headers: RVec<Header>,
                    $($envelope_extra)*
                }

                #[repr(C)]
                #[derive(StableAbi)]
                pub struct TransportInfo {
                    pub local_address: RString,
                    pub max_message_size: $max_message_size,
                }

                #[sabi_trait]
                pub trait Transport: Send + Sync {
                    fn info(&self) -> TransportInfo;

                    fn send(&self, $($send)*) -> u32;

                    #[sabi(last_prefix_field)]
                    fn close(&self) -> u32;

                    $($transport_extra)*
                }

                #[repr(C)]
                #[derive(StableAbi)]
                #[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
                #[sabi(missing_field(option))]
                pub struct PluginModule {
                    pub new_transport: extern "C" fn(config: RString) -> Transport_TO<'static, RBox<()>>,
                    #[sabi(last_prefix_field)]
                    pub attach_host: extern "C" fn(worker_threads: u32),
                    $($module_extra)*
                }

                pub fn root() -> &'static abi_stable::type_layout::TypeLayout {
                    <PluginModuleRef as StableAbi>::LAYOUT
                }
            }
        };
    }

    contract!(v1_0, header {}, envelope {}, max_message_size: u64, send(address: RString, envelope: Envelope),
        transport {}, module {});
    contract!(
        v1_1,
        header {},
        envelope {},
        max_message_size: u64,
        send(address: RString, envelope: Envelope),
        transport {
            fn flush(&self) -> u32 {
                0
            }
        },
        module {
            pub config_help: extern "C" fn() -> RString,
        }
    );
    // 1.0 changed without a new major version, in five ways.
    contract!(envelope_grew, header {}, envelope { pub priority: u8, }, max_message_size: u64,
        send(address: RString, envelope: Envelope), transport {}, module {});
    contract!(header_grew, header { pub sensitive: bool, }, envelope {}, max_message_size: u64,
        send(address: RString, envelope: Envelope), transport {}, module {});
    contract!(field_shrank, header {}, envelope {}, max_message_size: u32,
        send(address: RString, envelope: Envelope), transport {}, module {});
    contract!(parameter_retyped, header {}, envelope {}, max_message_size: u64,
        send(address: RString, envelope: Header), transport {}, module {});
    contract!(parameter_added, header {}, envelope {}, max_message_size: u64,
        send(address: RString, envelope: Envelope, priority: u8), transport {}, module {});

    /// What a message in the contract's words must not contain.
    const ABI_STABLE_WORDS: [&str; 6] = ["param_", "VTable", "__returns", "_TO", "PrefixRef", "field_"];

    fn mismatch(
        host: &'static TypeLayout,
        plugin: &'static TypeLayout,
        compatibility: Compatibility,
    ) -> LayoutMismatch {
        match check(host, plugin, compatibility) {
            Ok(()) => panic!("the layouts were accepted"),
            Err(mismatch) => mismatch,
        }
    }

    fn assert_in_contract_words(text: &str) {
        for word in ABI_STABLE_WORDS {
            assert!(!text.contains(word), "`{word}` in: {text}");
        }
    }

    #[test]
    fn an_older_plugin_loads_into_a_newer_host() {
        check(v1_1::root(), v1_0::root(), Compatibility::PluginOlder).expect("1.0 plugin in a 1.1 host");
        // What abi_stable's own loader does (the host's layout as the interface) refuses it.
        assert!(check_layout_compatibility(v1_1::root(), v1_0::root()).is_err());
        assert_eq!(additions(v1_1::root(), v1_0::root()), Vec::<String>::new());
    }

    #[test]
    fn a_newer_plugin_loads_into_an_older_host_which_names_what_it_will_not_use() {
        check(v1_0::root(), v1_1::root(), Compatibility::PluginNewer).expect("1.1 plugin in a 1.0 host");
        assert_eq!(additions(v1_0::root(), v1_1::root()), ["PluginModule::config_help", "Transport::flush"]);
        assert_eq!(additions(v1_0::root(), v1_0::root()), Vec::<String>::new());
    }

    #[test]
    fn a_grown_envelope_is_named_by_the_method_and_parameter_it_crosses() {
        let error = mismatch(v1_0::root(), envelope_grew::root(), Compatibility::Same);
        assert_eq!(error.mismatch(), "Transport::send(envelope): Envelope has 3 fields, this host expects 2");
        // A plugin older than the host: abi_stable's sides are swapped, the message is not.
        let error = mismatch(v1_1::root(), envelope_grew::root(), Compatibility::PluginOlder);
        assert_eq!(error.mismatch(), "Transport::send(envelope): Envelope has 3 fields, this host expects 2");
        // And the other way round: the host has the extra field.
        let error = mismatch(envelope_grew::root(), v1_0::root(), Compatibility::Same);
        assert_eq!(error.mismatch(), "Transport::send(envelope): Envelope has 2 fields, this host expects 3");
    }

    #[test]
    fn a_mismatch_deeper_inside_names_the_fields_that_lead_to_it() {
        let error = mismatch(v1_0::root(), header_grew::root(), Compatibility::Same);
        assert_eq!(
            error.mismatch(),
            "Transport::send(envelope): Envelope.headers: Header has 3 fields, this host expects 2"
        );
        let error = mismatch(v1_0::root(), field_shrank::root(), Compatibility::Same);
        assert_eq!(
            error.mismatch(),
            "the return type of Transport::info: TransportInfo.max_message_size is `u32`, this host expects `u64`"
        );
    }

    #[test]
    fn a_changed_signature_is_named_by_its_method() {
        let error = mismatch(v1_0::root(), parameter_retyped::root(), Compatibility::Same);
        assert_eq!(error.mismatch(), "Transport::send(envelope) is `Header`, this host expects `Envelope`");
        let error = mismatch(v1_0::root(), parameter_added::root(), Compatibility::Same);
        assert_eq!(error.mismatch(), "Transport::send takes 3 parameter(s), this host expects 2");
        let details = error.details();
        assert!(
            details
                .contains("in the plugin: fn(address: RString, envelope: Envelope, parameter 3: u8) -> u32"),
            "{details}"
        );
        assert!(
            details.contains("in this host:  fn(address: RString, envelope: Envelope) -> u32"),
            "{details}"
        );
    }

    #[test]
    fn details_show_the_path_and_both_sides_of_the_mismatched_type() {
        let broken = [
            envelope_grew::root(),
            header_grew::root(),
            field_shrank::root(),
            parameter_retyped::root(),
            parameter_added::root(),
        ];
        for plugin in broken {
            let error = mismatch(v1_0::root(), plugin, Compatibility::Same);
            let details = error.details();
            assert_in_contract_words(&error.mismatch());
            let lines = details.lines().count();
            assert!((4..=MAX_DETAIL_LINES).contains(&lines), "{lines} lines:\n{details}");
            assert!(details.starts_with("where, from the root module down:\n"), "{details}");
            assert_in_contract_words(&details);
        }
        let details = mismatch(v1_0::root(), envelope_grew::root(), Compatibility::Same).details();
        for expected in [
            "\n  PluginModule::new_transport returns Transport\n  Transport::send(envelope): Envelope\n\n",
            "Envelope in the plugin (3 fields):",
            "  priority: u8    <- differs",
            "Envelope in this host (2 fields):",
            "  headers: RVec<Header>",
        ] {
            assert!(details.contains(expected), "no `{expected}` in:\n{details}");
        }
    }

    /// The contract objects reachable from `root`, by name: prefix types of the contract's
    /// package.
    fn objects(root: &'static TypeLayout) -> BTreeMap<String, &'static TypeLayout> {
        fn walk(
            layout: &'static TypeLayout,
            package: &str,
            seen: &mut HashSet<UTypeId>,
            found: &mut BTreeMap<String, &'static TypeLayout>,
        ) {
            if !seen.insert(layout.get_utypeid()) {
                return;
            }
            if is_object(layout, package) {
                found.insert(object_name(layout), layout);
            }
            let fields = layout.phantom_fields().to_vec().into_iter().chain(fields_of(layout));
            for field in fields {
                for function in field.function_range().iter() {
                    for param in function.param_type_layouts.iter() {
                        walk(param(), package, seen, found);
                    }
                    if let Some(returns) = function.return_type_layout() {
                        walk(returns(), package, seen, found);
                    }
                }
                walk(field.layout(), package, seen, found);
            }
        }
        let mut found = BTreeMap::new();
        walk(root, contract_package(root), &mut HashSet::new(), &mut found);
        found
    }

    #[test]
    fn parameter_names_cover_exactly_the_methods_of_the_real_contract() {
        let objects = objects(<PluginModuleRef as StableAbi>::LAYOUT);
        let names: Vec<&str> = objects.keys().map(String::as_str).collect();
        assert_eq!(names, ["Discovery", "HostServices", "HostSocket", "PluginModule", "Transport"]);
        let mut methods = Vec::new();
        for (object, layout) in objects.iter().filter(|(object, _)| *object != "PluginModule") {
            for field in fields_of(layout).iter().filter(|field| !field.name().starts_with("_sabi")) {
                let function = field.function_range().iter().next().expect("a vtable entry is a function");
                let recorded = recorded_names(&function);
                assert_eq!(recorded.first().map(String::as_str), Some("_self"), "{object}::{}", field.name());
                methods.push((object.clone(), field.name().to_string(), recorded.len() - 1));
            }
        }
        let table: Vec<(String, String, usize)> =
            PARAMETER_NAMES.iter().map(|(o, m, names)| (o.to_string(), m.to_string(), names.len())).collect();
        let sorted = |mut list: Vec<(String, String, usize)>| {
            list.sort();
            list
        };
        assert_eq!(
            sorted(table),
            sorted(methods),
            "PARAMETER_NAMES must list every method of the contract's traits with its parameters"
        );
    }

    #[test]
    fn the_real_contract_matches_itself_and_adds_nothing() {
        let root = <PluginModuleRef as StableAbi>::LAYOUT;
        check(root, root, Compatibility::Same).expect("the contract is compatible with itself");
        assert_eq!(additions(root, root), Vec::<String>::new());
        assert_eq!(contract_package(root), "comms-core");
    }
}
