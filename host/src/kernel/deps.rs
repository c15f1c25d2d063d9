//! Dependency order: which services start first, and which cannot start at all.

use std::collections::{BTreeMap, BTreeSet};

/// Why a service cannot be started in dependency order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DependencyError {
    /// A dependency is not registered at all.
    #[error("service `{service}` depends on `{dependency}`, which is not loaded")]
    Missing {
        /// The dependent service.
        service: String,
        /// The missing dependency.
        dependency: String,
    },
    /// The service is part of a dependency cycle.
    #[error("dependency cycle: {}", cycle.join(" -> "))]
    Cycle {
        /// The cycle, starting and ending with the same service.
        cycle: Vec<String>,
    },
    /// A dependency cannot start (it is missing a dependency itself, or in a cycle).
    #[error("service `{service}` depends on `{dependency}`, which cannot start")]
    Blocked {
        /// The dependent service.
        service: String,
        /// The dependency that cannot start.
        dependency: String,
    },
}

/// The result of planning: the start order and the services that cannot start.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Every startable service, dependencies first, ties broken by name.
    pub order: Vec<String>,
    /// Services that cannot start, with the reason.
    pub blocked: BTreeMap<String, DependencyError>,
}

/// Plans the start order of `graph` (service → its dependencies).
pub(crate) fn plan(graph: &BTreeMap<String, Vec<String>>) -> Plan {
    let mut blocked: BTreeMap<String, DependencyError> = BTreeMap::new();
    for (service, deps) in graph {
        if let Some(dependency) = deps.iter().find(|d| !graph.contains_key(*d)) {
            blocked.insert(
                service.clone(),
                DependencyError::Missing {
                    service: service.clone(),
                    dependency: dependency.clone(),
                },
            );
        }
    }

    let mut order: Vec<String> = Vec::new();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    loop {
        propagate_blocked(graph, &mut blocked);
        // The smallest name among the services whose dependencies are all placed.
        let next = graph.iter().find(|(service, deps)| {
            !placed.contains(service.as_str())
                && !blocked.contains_key(*service)
                && deps.iter().all(|d| placed.contains(d.as_str()))
        });
        match next {
            Some((service, _)) => {
                placed.insert(service);
                order.push(service.clone());
            }
            None => break,
        }
    }

    // What is left is in a cycle, or waits on one.
    let left: BTreeSet<&str> = graph
        .keys()
        .map(String::as_str)
        .filter(|s| !placed.contains(s) && !blocked.contains_key(*s))
        .collect();
    for start in &left {
        if blocked.contains_key(*start) {
            continue;
        }
        if let Some(cycle) = find_cycle(graph, &left, start) {
            for member in &cycle[..cycle.len() - 1] {
                blocked.insert(
                    member.clone(),
                    DependencyError::Cycle {
                        cycle: cycle.clone(),
                    },
                );
            }
        }
    }
    propagate_blocked(graph, &mut blocked);
    Plan { order, blocked }
}

/// Marks every service that depends on a blocked one as blocked, until nothing changes.
fn propagate_blocked(
    graph: &BTreeMap<String, Vec<String>>,
    blocked: &mut BTreeMap<String, DependencyError>,
) {
    loop {
        let newly: Vec<(String, String)> = graph
            .iter()
            .filter(|(service, _)| !blocked.contains_key(*service))
            .filter_map(|(service, deps)| {
                deps.iter()
                    .find(|d| blocked.contains_key(*d))
                    .map(|d| (service.clone(), d.clone()))
            })
            .collect();
        if newly.is_empty() {
            return;
        }
        for (service, dependency) in newly {
            blocked.insert(
                service.clone(),
                DependencyError::Blocked {
                    service,
                    dependency,
                },
            );
        }
    }
}

/// Follows dependencies (within `left`) from `start`; returns the cycle it runs into,
/// rotated to begin at its smallest name and closed (`a -> b -> a`).
fn find_cycle(
    graph: &BTreeMap<String, Vec<String>>,
    left: &BTreeSet<&str>,
    start: &str,
) -> Option<Vec<String>> {
    let mut path: Vec<&str> = vec![start];
    let mut current = start;
    loop {
        let next = graph[current]
            .iter()
            .map(String::as_str)
            .find(|d| left.contains(d))?;
        if let Some(at) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            let min = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| *s)
                .map(|(i, _)| i)
                .unwrap_or(0);
            cycle.rotate_left(min);
            cycle.push(cycle[0].clone());
            return Some(cycle);
        }
        path.push(next);
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(s, deps)| (s.to_string(), deps.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    #[test]
    fn dependencies_come_first_and_ties_are_broken_by_name() {
        let plan = plan(&graph(&[
            ("logger", &["echo"]),
            ("echo", &[]),
            ("kv", &[]),
            ("audit", &["logger", "kv"]),
        ]));
        assert_eq!(plan.order, ["echo", "kv", "logger", "audit"]);
        assert!(plan.blocked.is_empty());
    }

    #[test]
    fn a_missing_dependency_blocks_the_service_and_its_dependents_only() {
        let plan = plan(&graph(&[
            ("logger", &["echo"]),
            ("audit", &["logger"]),
            ("kv", &[]),
        ]));
        assert_eq!(plan.order, ["kv"]);
        assert_eq!(
            plan.blocked["logger"],
            DependencyError::Missing {
                service: "logger".into(),
                dependency: "echo".into()
            }
        );
        assert_eq!(
            plan.blocked["audit"],
            DependencyError::Blocked {
                service: "audit".into(),
                dependency: "logger".into()
            }
        );
    }

    #[test]
    fn a_cycle_is_named_from_its_smallest_member() {
        let plan = plan(&graph(&[
            ("b", &["c"]),
            ("c", &["a"]),
            ("a", &["b"]),
            ("d", &["a"]),
            ("e", &[]),
        ]));
        assert_eq!(plan.order, ["e"]);
        let cycle = DependencyError::Cycle {
            cycle: vec!["a".into(), "b".into(), "c".into(), "a".into()],
        };
        assert_eq!(plan.blocked["a"], cycle);
        assert_eq!(plan.blocked["c"], cycle);
        assert_eq!(cycle.to_string(), "dependency cycle: a -> b -> c -> a");
        assert!(matches!(plan.blocked["d"], DependencyError::Blocked { .. }));
    }
}
