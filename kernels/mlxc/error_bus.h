#ifndef RMLX_ERROR_BUS_H
#define RMLX_ERROR_BUS_H
#include "mlx/c/error.h"
#ifdef __cplusplus
extern "C" {
#endif
int rmlx_error_bus_subscribe(mlx_error_handler_func fun, void* data);
int rmlx_error_bus_subscribers(void);
#ifdef __cplusplus
}
#endif
#endif
